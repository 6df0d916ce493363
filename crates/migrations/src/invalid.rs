//! INVALID indexes: what a failed `CREATE INDEX CONCURRENTLY` leaves behind.
//!
//! A concurrent index build that fails (duplicate values for a unique index,
//! a lock timeout, a cancel) does not roll back: the index stays, marked
//! `indisvalid = false`, ignored by queries but still updated by every
//! write, and in the way of the next `CREATE INDEX` of the same name.
//! `status` lists them with the migration that names them; `repair_failed`
//! drops the ones the failed migration built.

use std::fmt;

use sqlx::{AssertSqlSafe, PgConnection};

use crate::error::{Result, db};
use crate::scan;
use crate::source::Migration;

/// An index PostgreSQL marks INVALID (`pg_index.indisvalid = false`).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct InvalidIndex {
    /// Its schema.
    pub schema: String,
    /// Its name.
    pub name: String,
    /// The table it indexes (schema-qualified when not on the search path).
    pub table: String,
    /// `pg_get_indexdef`: the statement that would build it.
    pub definition: String,
    /// The migration whose `CREATE INDEX CONCURRENTLY` names it (a failed
    /// one first), if any.
    pub version: Option<i64>,
}

impl InvalidIndex {
    /// `schema.name`, each part quoted when it needs to be.
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", quote(&self.schema), quote(&self.name))
    }
}

impl fmt::Display for InvalidIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} on {}", self.qualified_name(), self.table)?;
        if let Some(version) = self.version {
            write!(f, " (built by migration {version})")?;
        }
        Ok(())
    }
}

/// An identifier, double-quoted unless it is plain lower case.
fn quote(ident: &str) -> String {
    let plain = ident
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && ident
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain {
        ident.to_owned()
    } else {
        format!("\"{}\"", ident.replace('"', "\"\""))
    }
}

/// Every INVALID index outside the system schemas. An index being built
/// concurrently right now is INVALID until its build ends.
pub(crate) async fn list(conn: &mut PgConnection) -> Result<Vec<InvalidIndex>> {
    let rows: Vec<(String, String, String, String)> = sqlx::query_as(
        "SELECT n.nspname::text, c.relname::text, i.indrelid::regclass::text, \
                pg_get_indexdef(i.indexrelid) \
         FROM pg_index i \
         JOIN pg_class c ON c.oid = i.indexrelid \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE NOT i.indisvalid \
           AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
           AND n.nspname NOT LIKE 'pg\\_toast%' \
         ORDER BY 1, 2",
    )
    .fetch_all(&mut *conn)
    .await
    .map_err(db("looking for INVALID indexes"))?;
    Ok(rows
        .into_iter()
        .map(|(schema, name, table, definition)| InvalidIndex {
            schema,
            name,
            table,
            definition,
            version: None,
        })
        .collect())
}

/// Whether `m` builds `index` with `CREATE INDEX CONCURRENTLY` (in its up
/// or its down script).
pub(crate) fn built_by(index: &InvalidIndex, m: &Migration) -> bool {
    let scripts = std::iter::once(m.up()).chain(m.down());
    scripts.into_iter().any(|script| {
        scan::shape(script.sql())
            .concurrent_indexes
            .iter()
            .any(|(schema, name)| {
                *name == index.name && schema.as_ref().is_none_or(|s| *s == index.schema)
            })
    })
}

/// `DROP INDEX CONCURRENTLY IF EXISTS` (on a session outside a transaction).
pub(crate) async fn drop(conn: &mut PgConnection, index: &InvalidIndex) -> Result<()> {
    let sql = format!(
        "DROP INDEX CONCURRENTLY IF EXISTS {}",
        index.qualified_name()
    );
    tracing::info!(index = %index.qualified_name(), "dropping an INVALID index");
    sqlx::raw_sql(AssertSqlSafe(sql))
        .execute(&mut *conn)
        .await
        .map_err(db("dropping an INVALID index"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_quoted_when_needed() {
        assert_eq!(quote("t_x_key"), "t_x_key");
        assert_eq!(quote("Mixed"), "\"Mixed\"");
        assert_eq!(quote("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote("1st"), "\"1st\"");
    }

    #[test]
    fn an_index_is_built_by_the_migration_that_names_it() {
        let migrations = crate::Migrations::from_files(
            [
                (
                    "0001_idx.up.sql",
                    "-- no-transaction\nCREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS t_x_key ON t (x);",
                ),
                ("0002_other.up.sql", "CREATE INDEX t_y_key ON t (y);"),
            ],
            &crate::LoadOptions::default(),
        )
        .unwrap();
        let index = |schema: &str, name: &str| InvalidIndex {
            schema: schema.to_owned(),
            name: name.to_owned(),
            table: "t".to_owned(),
            definition: String::new(),
            version: None,
        };
        let one = migrations.get(1).unwrap();
        assert!(built_by(&index("public", "t_x_key"), one));
        assert!(
            built_by(&index("other", "t_x_key"), one),
            "unqualified: any schema"
        );
        assert!(!built_by(&index("public", "t_y_key"), one));
        assert!(
            !built_by(&index("public", "t_y_key"), migrations.get(2).unwrap()),
            "not concurrently"
        );
    }
}
