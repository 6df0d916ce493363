//! Index and constraint checks: foreign keys without an index, unused,
//! duplicate, redundant and invalid indexes, constraints never validated.

use std::collections::BTreeMap;

use pgstack_pool::tokio_postgres::{Client, Row};

use super::{Check, Finding, Found, Severity, Thresholds, bytes, count};

/// Schemas that belong to PostgreSQL itself.
const USER_SCHEMAS: &str = "n.nspname NOT IN ('pg_catalog', 'information_schema') \
     AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'";

/// One index, as the checks need it.
#[derive(Debug, Clone)]
struct Index {
    table_oid: u32,
    table: String,
    name: String,
    /// All columns (key, then INCLUDE); 0 stands for an expression.
    keys: Vec<i16>,
    /// How many of `keys` are key columns.
    key_count: usize,
    classes: Vec<String>,
    collations: String,
    options: String,
    method: String,
    expressions: Option<String>,
    predicate: Option<String>,
    unique: bool,
    primary: bool,
    valid: bool,
    size: i64,
    definition: String,
    /// The PRIMARY KEY, UNIQUE or EXCLUDE constraint it backs.
    constraint: Option<String>,
}

impl Index {
    fn from_row(row: &Row) -> Index {
        let keys: Vec<i16> = row.get("keys");
        let key_count = usize::try_from(row.get::<_, i16>("key_count")).unwrap_or(keys.len());
        Index {
            table_oid: row.get("table_oid"),
            table: row.get("table_name"),
            name: row.get("index_name"),
            keys,
            key_count,
            classes: row.get("classes"),
            collations: row.get("collations"),
            options: row.get("options"),
            method: row.get("method"),
            expressions: row.get("expressions"),
            predicate: row.get("predicate"),
            unique: row.get("is_unique"),
            primary: row.get("is_primary"),
            valid: row.get("is_valid"),
            size: row.get("size"),
            definition: row.get("definition"),
            constraint: row.get("constraint_name"),
        }
    }

    /// The part of the definition after `USING method`: `(a, b) WHERE …`.
    fn shape(&self) -> &str {
        self.definition
            .split_once(" USING ")
            .map_or(self.definition.as_str(), |(_, rest)| rest)
    }

    /// A plain b-tree index on columns only: no expression, no predicate.
    fn plain_btree(&self) -> bool {
        self.method == "btree"
            && self.valid
            && self.expressions.is_none()
            && self.predicate.is_none()
            && !self.keys.contains(&0)
    }
}

async fn inventory(client: &Client) -> Result<Vec<Index>, pgstack_pool::tokio_postgres::Error> {
    let sql = format!(
        "SELECT i.indrelid AS table_oid,
                format('%I.%I', n.nspname, t.relname) AS table_name,
                format('%I.%I', n.nspname, c.relname) AS index_name,
                string_to_array(i.indkey::text, ' ')::int2[] AS keys,
                i.indnkeyatts AS key_count,
                string_to_array(i.indclass::text, ' ') AS classes,
                i.indcollation::text AS collations,
                i.indoption::text AS options,
                am.amname::text AS method,
                pg_get_expr(i.indexprs, i.indrelid) AS expressions,
                pg_get_expr(i.indpred, i.indrelid) AS predicate,
                i.indisunique AS is_unique,
                i.indisprimary AS is_primary,
                i.indisvalid AS is_valid,
                pg_relation_size(i.indexrelid) AS size,
                pg_get_indexdef(i.indexrelid) AS definition,
                con.conname::text AS constraint_name
           FROM pg_index i
           JOIN pg_class c ON c.oid = i.indexrelid
           JOIN pg_class t ON t.oid = i.indrelid
           JOIN pg_namespace n ON n.oid = t.relnamespace
           JOIN pg_am am ON am.oid = c.relam
           LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.contype IN ('p', 'u', 'x')
          WHERE {USER_SCHEMAS}
          ORDER BY 2, 3"
    );
    Ok(client
        .query(&sql, &[])
        .await?
        .iter()
        .map(Index::from_row)
        .collect())
}

/// A foreign key and its columns.
struct ForeignKey {
    table_oid: u32,
    table: String,
    name: String,
    referenced: String,
    attnums: Vec<i16>,
    columns: Vec<String>,
    rows: i64,
    size: i64,
}

async fn foreign_keys(
    client: &Client,
) -> Result<Vec<ForeignKey>, pgstack_pool::tokio_postgres::Error> {
    let sql = format!(
        "SELECT c.conrelid AS table_oid,
                format('%I.%I', n.nspname, t.relname) AS table_name,
                c.conname::text AS name,
                (SELECT format('%I.%I', rn.nspname, r.relname) FROM pg_class r
                   JOIN pg_namespace rn ON rn.oid = r.relnamespace WHERE r.oid = c.confrelid) AS referenced,
                c.conkey AS attnums,
                ARRAY(SELECT quote_ident(a.attname)
                        FROM unnest(c.conkey) WITH ORDINALITY k(attnum, ord)
                        JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum
                       ORDER BY k.ord) AS columns,
                t.reltuples::bigint AS rows,
                pg_table_size(c.conrelid) AS size
           FROM pg_constraint c
           JOIN pg_class t ON t.oid = c.conrelid
           JOIN pg_namespace n ON n.oid = t.relnamespace
          WHERE c.contype = 'f' AND c.conparentid = 0 AND {USER_SCHEMAS}
          ORDER BY 2, 3"
    );
    Ok(client
        .query(&sql, &[])
        .await?
        .iter()
        .map(|row| ForeignKey {
            table_oid: row.get("table_oid"),
            table: row.get("table_name"),
            name: row.get("name"),
            referenced: row.get("referenced"),
            attnums: row.get("attnums"),
            columns: row.get("columns"),
            rows: row.get("rows"),
            size: row.get("size"),
        })
        .collect())
}

/// Whether `index` serves lookups by `fk`'s columns: a valid index whose
/// leading key columns are exactly the foreign key's (in any order), with no
/// predicate or only `col IS NOT NULL` on those columns (which an equality
/// lookup implies).
fn serves(index: &Index, fk: &ForeignKey) -> bool {
    let n = fk.attnums.len();
    if index.table_oid != fk.table_oid || !index.valid || index.key_count < n {
        return false;
    }
    // A b-tree serves any leading columns; a hash index one column only.
    let method_serves = match index.method.as_str() {
        "btree" => true,
        "hash" => n == 1,
        _ => false,
    };
    if !method_serves {
        return false;
    }
    let mut leading: Vec<i16> = index.keys.iter().take(n).copied().collect();
    let mut wanted = fk.attnums.clone();
    leading.sort_unstable();
    wanted.sort_unstable();
    if leading != wanted {
        return false;
    }
    match &index.predicate {
        None => true,
        Some(predicate) => only_not_null(predicate, &fk.columns),
    }
}

/// Whether `predicate` (as `pg_get_expr` prints it) is `col IS NOT NULL`, or
/// an AND of such, on `columns` only.
fn only_not_null(predicate: &str, columns: &[String]) -> bool {
    let flat: String = predicate
        .chars()
        .filter(|c| !matches!(c, '(' | ')'))
        .collect();
    flat.split(" AND ").all(|part| {
        part.trim()
            .strip_suffix(" IS NOT NULL")
            .is_some_and(|column| columns.iter().any(|c| c == column.trim()))
    })
}

/// An index name for `table`'s `columns`: `table_col_idx`, at most 63 bytes.
fn index_name(table: &str, columns: &[String]) -> String {
    let bare = |s: &str| s.trim_matches('"').to_owned();
    let table = table.rsplit('.').next().map_or(String::new(), bare);
    let mut name = format!(
        "{table}_{}_idx",
        columns
            .iter()
            .map(|c| bare(c))
            .collect::<Vec<_>>()
            .join("_")
    );
    while name.len() > 63 {
        name.remove(0);
    }
    name
}

/// A name as an SQL identifier (quoted only when it must be).
fn ident(name: &str) -> String {
    let plain = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain {
        name.to_owned()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

pub(super) async fn fk_without_index(client: &Client) -> Found {
    let indexes = inventory(client).await?;
    let fks = foreign_keys(client).await?;
    Ok(fks
        .iter()
        .filter(|fk| !indexes.iter().any(|index| serves(index, fk)))
        .map(|fk| {
            let columns = fk.columns.join(", ");
            // CREATE INDEX puts the index in its table's schema; its name takes none.
            let name = ident(&index_name(&fk.table, &fk.columns));
            Finding {
                check: Check::ForeignKeyWithoutIndex,
                severity: Severity::Warning,
                subject: format!("{} ({columns})", fk.table),
                evidence: format!(
                    "foreign key {} ({columns}) references {}; no valid index of {} starts with ({columns}); \
                     the table {} and takes {}",
                    fk.name,
                    fk.referenced,
                    fk.table,
                    if fk.rows < 0 {
                        "has not been analyzed yet".to_owned()
                    } else {
                        format!("has about {} rows", count(fk.rows))
                    },
                    bytes(fk.size)
                ),
                why: format!(
                    "Every DELETE of a row of {} (and every UPDATE of its key) makes PostgreSQL look for \
                     referencing rows in {}: without an index that is a sequential scan of {} per row, \
                     holding locks while it runs; joins on the key scan too.",
                    fk.referenced, fk.table, fk.table
                ),
                fix_sql: format!(
                    "CREATE INDEX CONCURRENTLY {name} ON {} ({columns});",
                    fk.table
                ),
            }
        })
        .collect())
}

pub(super) async fn unused(client: &Client, t: &Thresholds, since: Option<&str>) -> Found {
    let indexes = inventory(client).await?;
    let fks = foreign_keys(client).await?;
    let min = i64::try_from(t.unused_index_min_bytes).unwrap_or(i64::MAX);
    let rows = client
        .query(
            "SELECT format('%I.%I', s.schemaname, s.indexrelname) AS index_name, s.idx_scan
               FROM pg_stat_user_indexes s
              WHERE s.idx_scan = 0 AND pg_relation_size(s.indexrelid) >= $1",
            &[&min],
        )
        .await?;
    let mut found = Vec::new();
    for row in rows {
        let name: String = row.get("index_name");
        let Some(index) = indexes.iter().find(|i| i.name == name) else {
            continue;
        };
        // Unique and primary-key indexes enforce something; an invalid one is
        // its own finding; a foreign key's only index keeps its checks fast.
        if index.unique || index.primary || !index.valid || index.constraint.is_some() {
            continue;
        }
        let only_index_of_a_fk = fks.iter().any(|fk| {
            serves(index, fk)
                && !indexes
                    .iter()
                    .any(|other| other.name != index.name && serves(other, fk))
        });
        if only_index_of_a_fk {
            continue;
        }
        let since = since.map_or_else(
            || "since the statistics began".to_owned(),
            |since| format!("since {since}"),
        );
        found.push(Finding {
            check: Check::UnusedIndex,
            severity: Severity::Warning,
            subject: index.name.clone(),
            evidence: format!(
                "{} on {} has had 0 scans {since}; it takes {} ({})",
                index.name,
                index.table,
                bytes(index.size),
                index.shape()
            ),
            why: "An index nobody reads still costs on every INSERT, UPDATE and DELETE of its table, \
                  in WAL, in backups and in cache space. Check the replicas first: the statistics are \
                  per server, and an index used only by queries on a replica shows 0 scans here."
                .to_owned(),
            fix_sql: format!("DROP INDEX CONCURRENTLY {};", index.name),
        });
    }
    Ok(found)
}

/// What makes two indexes the same index: table, columns (with INCLUDE),
/// operator classes, collations, options, method, expressions, predicate.
fn signature(index: &Index) -> String {
    format!(
        "{}|{:?}|{:?}|{}|{}|{}|{}|{}",
        index.table_oid,
        index.keys,
        index.classes,
        index.collations,
        index.options,
        index.method,
        index.expressions.as_deref().unwrap_or(""),
        index.predicate.as_deref().unwrap_or("")
    )
}

/// The SQL that removes `index`: its constraint when it backs one.
fn drop_sql(index: &Index) -> String {
    match &index.constraint {
        Some(constraint) => format!(
            "ALTER TABLE {} DROP CONSTRAINT {};",
            index.table,
            ident(constraint)
        ),
        None => format!("DROP INDEX CONCURRENTLY {};", index.name),
    }
}

pub(super) async fn duplicates(client: &Client) -> Found {
    let indexes = inventory(client).await?;
    let mut groups: BTreeMap<_, Vec<&Index>> = BTreeMap::new();
    for index in indexes.iter().filter(|i| i.valid) {
        groups.entry(signature(index)).or_default().push(index);
    }
    let mut found = Vec::new();
    for mut group in groups.into_values().filter(|g| g.len() > 1) {
        // Keep the primary key, else a constraint's index, else a unique one, else the first by name.
        group.sort_by_key(|i| {
            (
                !i.primary,
                i.constraint.is_none(),
                !i.unique,
                i.name.clone(),
            )
        });
        let Some((kept, extra)) = group.split_first() else {
            continue;
        };
        for index in extra {
            found.push(Finding {
                check: Check::DuplicateIndex,
                severity: Severity::Warning,
                subject: index.name.clone(),
                evidence: format!(
                    "{} duplicates {} on {}: both are {}; the duplicate takes {}",
                    index.name,
                    kept.name,
                    index.table,
                    index.shape(),
                    bytes(index.size)
                ),
                why: "Identical indexes give the planner nothing the first one does not, while every \
                      write to the table updates each of them and each takes disk and cache space."
                    .to_owned(),
                fix_sql: drop_sql(index),
            });
        }
    }
    Ok(found)
}

pub(super) async fn redundant(client: &Client) -> Found {
    let indexes = inventory(client).await?;
    let mut found = Vec::new();
    for index in indexes.iter().filter(|i| {
        i.plain_btree()
            && !i.unique
            && !i.primary
            && i.constraint.is_none()
            && i.key_count == i.keys.len()
    }) {
        let n = index.key_count;
        let cover = indexes.iter().find(|other| {
            other.name != index.name
                && other.table_oid == index.table_oid
                && other.plain_btree()
                && other.key_count > n
                && other.keys.get(..n) == index.keys.get(..n)
                && other.classes.get(..n) == index.classes.get(..n)
        });
        if let Some(cover) = cover {
            found.push(Finding {
                check: Check::RedundantIndex,
                severity: Severity::Warning,
                subject: index.name.clone(),
                evidence: format!(
                    "{} {} is the leading part of {} {} on {}; it takes {}",
                    index.name,
                    index.shape(),
                    cover.name,
                    cover.shape(),
                    index.table,
                    bytes(index.size)
                ),
                why: format!(
                    "Queries on the columns of {} can use {} instead (its leading columns are the same), \
                     while every write maintains both. Keep it only if measurements show the smaller \
                     index matters.",
                    index.name, cover.name
                ),
                fix_sql: format!("DROP INDEX CONCURRENTLY {};", index.name),
            });
        }
    }
    Ok(found)
}

pub(super) async fn invalid(client: &Client) -> Found {
    let indexes = inventory(client).await?;
    let building: Vec<String> = client
        .query(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_stat_progress_create_index p \
               JOIN pg_class c ON c.oid = p.index_relid JOIN pg_namespace n ON n.oid = c.relnamespace",
            &[],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    Ok(indexes
        .iter()
        .filter(|i| !i.valid && !building.contains(&i.name))
        .map(|index| {
            let concurrently = index
                .definition
                .replacen(" INDEX ", " INDEX CONCURRENTLY ", 1);
            let mut fix = format!("DROP INDEX CONCURRENTLY {};\n", index.name);
            if index.unique {
                fix.push_str(
                    "-- first remove the duplicate rows the build stopped on, then build it again:\n",
                );
            } else {
                fix.push_str("-- then build it again:\n");
            }
            fix.push_str(&format!("{concurrently};"));
            Finding {
                check: Check::InvalidIndex,
                severity: Severity::Warning,
                subject: index.name.clone(),
                evidence: format!(
                    "{} on {} is INVALID (pg_index.indisvalid = false) and no build of it is running; \
                     {}; it takes {}",
                    index.name,
                    index.table,
                    index.definition,
                    bytes(index.size)
                ),
                why: if index.unique {
                    "A CREATE UNIQUE INDEX CONCURRENTLY failed (usually on duplicate values) and left \
                     this index behind: queries never use it, yet writes still maintain it and may \
                     fail on its uniqueness, and whoever expected the constraint does not have it."
                        .to_owned()
                } else {
                    "A CREATE INDEX CONCURRENTLY (or REINDEX CONCURRENTLY) failed and left this index \
                     behind: queries never use it, yet every write still maintains it."
                        .to_owned()
                },
                fix_sql: fix,
            }
        })
        .collect())
}

pub(super) async fn invalid_constraints(client: &Client) -> Found {
    let sql = format!(
        "SELECT format('%I.%I', n.nspname, t.relname) AS table_name, c.conname::text AS name,
                c.contype::text AS kind, pg_get_constraintdef(c.oid) AS definition
           FROM pg_constraint c
           JOIN pg_class t ON t.oid = c.conrelid
           JOIN pg_namespace n ON n.oid = t.relnamespace
          WHERE NOT c.convalidated AND c.contype IN ('c', 'f') AND {USER_SCHEMAS}
          ORDER BY 1, 2"
    );
    Ok(client
        .query(&sql, &[])
        .await?
        .iter()
        .map(|row| {
            let table: String = row.get("table_name");
            let name: String = row.get("name");
            let kind: String = row.get("kind");
            let definition: String = row.get("definition");
            Finding {
                check: Check::InvalidConstraint,
                severity: Severity::Warning,
                subject: format!("{table} {name}"),
                evidence: format!(
                    "{} constraint {name} on {table} was added NOT VALID and never validated: {definition}",
                    if kind == "f" { "foreign key" } else { "check" }
                ),
                why: "New rows are checked, but rows from before it was added may break it, and the \
                      planner cannot rely on it. Validating takes only a SHARE UPDATE EXCLUSIVE lock: \
                      reads and writes go on."
                    .to_owned(),
                fix_sql: format!("ALTER TABLE {table} VALIDATE CONSTRAINT {};", ident(&name)),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_null_predicates_on_the_key_columns_are_accepted() {
        let cols = ["created_by".to_owned()];
        assert!(only_not_null("(created_by IS NOT NULL)", &cols));
        assert!(!only_not_null("(deleted_at IS NULL)", &cols));
        assert!(!only_not_null("(other IS NOT NULL)", &cols));
        let two = ["a".to_owned(), "b".to_owned()];
        assert!(only_not_null("((a IS NOT NULL) AND (b IS NOT NULL))", &two));
        assert!(!only_not_null("((a IS NOT NULL) OR (b IS NOT NULL))", &two));
    }

    #[test]
    fn index_names_are_short_and_plain_names_unquoted() {
        assert_eq!(
            index_name("public.entries", &["account_id".to_owned()]),
            "entries_account_id_idx"
        );
        assert!(index_name("public.t", &["c".repeat(80)]).len() <= 63);
        assert_eq!(ident("entries_idx"), "entries_idx");
        assert_eq!(ident("Entries"), "\"Entries\"");
    }
}
