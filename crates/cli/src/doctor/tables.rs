//! Table and database checks: dead rows, sequential scans, transaction-id
//! wraparound, sequences near their end, the cache hit ratio.

use std::collections::BTreeMap;

use pgstack_pool::tokio_postgres::Client;

use super::{
    CACHE_HIT_CRITICAL_RATIO, Check, DEAD_TUPLE_CRITICAL_RATIO, DEAD_TUPLES_MIN_ROWS, Finding,
    Found, SEQ_SCAN_INDEX_SHARE, SEQ_SCAN_MIN_SCANS, Severity, Thresholds, XID_AGE_WARNING_FACTOR,
    bytes, count, percent,
};

/// Whether a `autovacuum_enabled` reloption value turns it off.
fn off(value: &str) -> bool {
    matches!(
        value.to_ascii_lowercase().as_str(),
        "false" | "off" | "0" | "no" | "f" | "n"
    )
}

pub(super) async fn dead_tuples(client: &Client, t: &Thresholds) -> Found {
    let min_bytes = i64::try_from(t.dead_tuples_min_bytes).unwrap_or(i64::MAX);
    let rows = client
        .query(
            "SELECT format('%I.%I', s.schemaname, s.relname) AS table_name,
                    s.n_live_tup, s.n_dead_tup, pg_table_size(s.relid) AS size,
                    coalesce(greatest(s.last_vacuum, s.last_autovacuum)::text, 'never') AS last_vacuum,
                    (SELECT option_value FROM pg_options_to_table(c.reloptions)
                      WHERE option_name = 'autovacuum_enabled') AS table_autovacuum,
                    current_setting('autovacuum') AS autovacuum
               FROM pg_stat_user_tables s
               JOIN pg_class c ON c.oid = s.relid
              WHERE s.n_dead_tup >= $1 AND pg_table_size(s.relid) >= $2
              ORDER BY s.n_dead_tup DESC",
            &[&DEAD_TUPLES_MIN_ROWS, &min_bytes],
        )
        .await?;
    let mut found = Vec::new();
    for row in rows {
        let live: i64 = row.get("n_live_tup");
        let dead: i64 = row.get("n_dead_tup");
        let share = dead as f64 / (live + dead).max(1) as f64;
        if share < t.dead_tuple_ratio {
            continue;
        }
        let table: String = row.get("table_name");
        let last: String = row.get("last_vacuum");
        let table_off = row
            .get::<_, Option<String>>("table_autovacuum")
            .is_some_and(|v| off(&v));
        let server_off = off(&row.get::<_, String>("autovacuum"));
        let mut evidence = format!(
            "{} dead rows beside {} live ones ({} dead); the table takes {}; last vacuum: {last}",
            count(dead),
            count(live),
            percent(share),
            bytes(row.get("size"))
        );
        let mut fix = format!("VACUUM (ANALYZE, VERBOSE) {table};");
        if table_off {
            evidence
                .push_str("; autovacuum is switched off for this table (autovacuum_enabled = off)");
            fix.push_str(&format!(
                "\n-- and let autovacuum look after it again:\nALTER TABLE {table} RESET (autovacuum_enabled);"
            ));
        }
        if server_off {
            evidence.push_str("; autovacuum is off on this server");
            fix.push_str("\nALTER SYSTEM SET autovacuum = on;\nSELECT pg_reload_conf();");
        }
        if !table_off && !server_off {
            fix.push_str(
                "\n-- if autovacuum runs but cannot keep up, look for what holds it back (long transactions, \
                 idle-in-transaction sessions, stale replication slots) and consider a lower \
                 autovacuum_vacuum_scale_factor for this table:\n\
                 -- ALTER TABLE <table> SET (autovacuum_vacuum_scale_factor = 0.05);",
            );
        }
        found.push(Finding {
            check: Check::DeadTuples,
            severity: if share >= DEAD_TUPLE_CRITICAL_RATIO {
                Severity::Critical
            } else {
                Severity::Warning
            },
            subject: table,
            evidence,
            why: "Deleted and updated rows stay in the table until vacuum removes them: scans read \
                  them, indexes point at them, and the table and its indexes grow (bloat) instead of \
                  reusing the space. Autovacuum should have acted at 20 % dead rows."
                .to_owned(),
            fix_sql: fix,
        });
    }
    Ok(found)
}

pub(super) async fn seq_scans(client: &Client, t: &Thresholds, since: Option<&str>) -> Found {
    let rows = client
        .query(
            "SELECT format('%I.%I', schemaname, relname) AS table_name, seq_scan, seq_tup_read,
                    coalesce(idx_scan, 0) AS idx_scan, n_live_tup, pg_table_size(relid) AS size
               FROM pg_stat_user_tables
              WHERE n_live_tup >= $1 AND seq_scan >= $2
              ORDER BY seq_tup_read DESC",
            &[&t.seq_scan_min_rows, &SEQ_SCAN_MIN_SCANS],
        )
        .await?;
    let since = since.map_or_else(String::new, |s| format!(" since {s}"));
    let mut found = Vec::new();
    for row in rows {
        let seq: i64 = row.get("seq_scan");
        let idx: i64 = row.get("idx_scan");
        let share = idx as f64 / (seq + idx).max(1) as f64;
        if share >= SEQ_SCAN_INDEX_SHARE {
            continue;
        }
        let table: String = row.get("table_name");
        found.push(Finding {
            check: Check::SequentialScans,
            severity: Severity::Warning,
            evidence: format!(
                "{} sequential scans read {} rows{since}, against {} index scans ({} of all scans); \
                 the table has {} live rows and takes {}",
                count(seq),
                count(row.get("seq_tup_read")),
                count(idx),
                percent(share),
                count(row.get("n_live_tup")),
                bytes(row.get("size"))
            ),
            subject: table.clone(),
            why: "Each sequential scan reads the whole table: on a large table, queries that filter \
                  or join on columns without an index spend their time and the cache reading rows \
                  they throw away."
                .to_owned(),
            fix_sql: format!(
                "-- find the statements that scan {table} (pg_stat_statements, or pgstack's slow-query log)\n\
                 -- and index the columns they filter or join on, e.g.:\n\
                 -- CREATE INDEX CONCURRENTLY ON {table} (<column>);"
            ),
        });
    }
    Ok(found)
}

/// How serious an age is, given the warning and critical ages.
pub(super) fn age_severity(age: i64, warning: i64, critical: i64) -> Option<Severity> {
    if age >= critical {
        Some(Severity::Critical)
    } else if age >= warning {
        Some(Severity::Warning)
    } else {
        None
    }
}

/// The transaction-id space: 2^31.
const XID_LIMIT: f64 = 2_147_483_648.0;

pub(super) async fn wraparound(client: &Client, t: &Thresholds) -> Found {
    let rows = client
        .query(
            "SELECT datname::text, age(datfrozenxid)::bigint AS xid_age,
                    mxid_age(datminmxid)::bigint AS mxid_age,
                    current_setting('autovacuum_freeze_max_age')::bigint AS freeze_max_age,
                    current_setting('autovacuum_multixact_freeze_max_age')::bigint AS mxid_freeze_max_age,
                    datname = current_database() AS current
               FROM pg_database WHERE datallowconn
              ORDER BY 2 DESC",
            &[],
        )
        .await?;
    let oldest: Vec<String> = client
        .query(
            "SELECT format('%I.%I (age %s)', n.nspname, c.relname,
                           greatest(age(c.relfrozenxid), coalesce(age(t.relfrozenxid), 0)))
               FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
               LEFT JOIN pg_class t ON t.oid = c.reltoastrelid
              WHERE c.relkind IN ('r', 'm')
              ORDER BY greatest(age(c.relfrozenxid), coalesce(age(t.relfrozenxid), 0)) DESC
              LIMIT 3",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut found = Vec::new();
    for row in rows {
        let database: String = row.get("datname");
        let xid_age: i64 = row.get("xid_age");
        let mxid_age: i64 = row.get("mxid_age");
        let freeze_max: i64 = row.get("freeze_max_age");
        let mxid_freeze_max: i64 = row.get("mxid_freeze_max_age");
        let warning = t
            .xid_age_warning
            .unwrap_or((freeze_max as f64 * XID_AGE_WARNING_FACTOR) as i64);
        let mxid_warning = t
            .xid_age_warning
            .unwrap_or((mxid_freeze_max as f64 * XID_AGE_WARNING_FACTOR) as i64);
        let xid = age_severity(xid_age, warning, t.xid_age_critical);
        let mxid = age_severity(mxid_age, mxid_warning, t.xid_age_critical);
        let Some(severity) = xid.max(mxid) else {
            continue;
        };
        let mut evidence = format!(
            "age(datfrozenxid) is {} transactions: {} of the 2^31 limit and {:.2} × \
             autovacuum_freeze_max_age ({}); multixact age {} ({:.2} × autovacuum_multixact_freeze_max_age); \
             warning from {}, critical from {}",
            count(xid_age),
            percent(xid_age as f64 / XID_LIMIT),
            xid_age as f64 / freeze_max.max(1) as f64,
            count(freeze_max),
            count(mxid_age),
            mxid_age as f64 / mxid_freeze_max.max(1) as f64,
            count(warning),
            count(t.xid_age_critical)
        );
        let current: bool = row.get("current");
        if current && !oldest.is_empty() {
            evidence.push_str(&format!("; oldest tables: {}", oldest.join(", ")));
        }
        found.push(Finding {
            check: Check::XidWraparound,
            severity,
            subject: format!("database {database}"),
            evidence,
            why: "PostgreSQL must freeze old rows before 2^31 transactions pass them by. Past \
                  autovacuum_freeze_max_age autovacuum freezes on its own; an age that keeps growing \
                  beyond it means something holds freezing back (a long or prepared transaction, a \
                  replication slot, autovacuum unable to finish), and 3 million transactions before \
                  the limit the server stops accepting writes."
                .to_owned(),
            fix_sql: format!(
                "-- first end what holds the horizon back:\n\
                 SELECT pid, state, xact_start, age(backend_xmin) FROM pg_stat_activity \
                 WHERE backend_xmin IS NOT NULL ORDER BY age(backend_xmin) DESC;\n\
                 SELECT gid, prepared FROM pg_prepared_xacts ORDER BY prepared;\n\
                 SELECT slot_name, active, xmin, catalog_xmin FROM pg_replication_slots;\n\
                 -- then, connected to {database}:\n\
                 VACUUM (FREEZE, VERBOSE);"
            ),
        });
    }
    Ok(found)
}

/// One sequence and (when it has one) the column it feeds.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct SequenceUse {
    pub(super) last: i64,
    pub(super) min: i64,
    pub(super) max: i64,
    pub(super) increment: i64,
    /// The column type's own bounds, when narrower than bigint.
    pub(super) column_bounds: Option<(i64, i64)>,
}

impl SequenceUse {
    /// The share of the sequence's own range used.
    pub(super) fn sequence_share(&self) -> f64 {
        share(self.last, self.min, self.max, self.increment)
    }

    /// The share of the range its column can hold, when that is narrower.
    pub(super) fn column_share(&self) -> Option<f64> {
        let (low, high) = self.column_bounds?;
        if self.increment > 0 && high < self.max {
            Some(share(self.last, self.min, high, self.increment))
        } else if self.increment < 0 && low > self.min {
            Some(share(self.last, low, self.max, self.increment))
        } else {
            None
        }
    }
}

/// How much of `min..=max` a sequence at `last` has used, in the direction of `increment`.
fn share(last: i64, min: i64, max: i64, increment: i64) -> f64 {
    let span = (i128::from(max) - i128::from(min)).max(1) as f64;
    let used = if increment >= 0 {
        i128::from(last) - i128::from(min)
    } else {
        i128::from(max) - i128::from(last)
    };
    (used.max(0) as f64 / span).min(1.0)
}

pub(super) async fn sequences(client: &Client, t: &Thresholds) -> Found {
    let rows = client
        .query(
            "WITH feeds AS (
                 SELECT d.objid AS seq, d.refobjid AS rel, d.refobjsubid AS attnum
                   FROM pg_depend d
                  WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
                    AND d.refobjsubid > 0 AND d.deptype IN ('a', 'i')
                 UNION
                 SELECT d.refobjid, ad.adrelid, ad.adnum
                   FROM pg_depend d
                   JOIN pg_attrdef ad ON ad.oid = d.objid
                  WHERE d.classid = 'pg_attrdef'::regclass AND d.refclassid = 'pg_class'::regclass
             )
             SELECT format('%I.%I', s.schemaname, s.sequencename) AS sequence_name,
                    s.data_type::text AS data_type, s.last_value, s.min_value, s.max_value, s.increment_by,
                    format('%I.%I', tn.nspname, t.relname) AS table_name,
                    quote_ident(a.attname) AS column_name,
                    format_type(a.atttypid, a.atttypmod) AS column_type,
                    CASE a.atttypid WHEN 'int2'::regtype THEN -32768 WHEN 'int4'::regtype THEN -2147483648 END::bigint AS column_min,
                    CASE a.atttypid WHEN 'int2'::regtype THEN 32767 WHEN 'int4'::regtype THEN 2147483647 END::bigint AS column_max
               FROM pg_sequences s
               JOIN pg_namespace sn ON sn.nspname = s.schemaname
               JOIN pg_class sc ON sc.relnamespace = sn.oid AND sc.relname = s.sequencename
               LEFT JOIN feeds f ON f.seq = sc.oid
               LEFT JOIN pg_class t ON t.oid = f.rel
               LEFT JOIN pg_namespace tn ON tn.oid = t.relnamespace
               LEFT JOIN pg_attribute a ON a.attrelid = f.rel AND a.attnum = f.attnum
              WHERE s.last_value IS NOT NULL AND NOT s.cycle",
            &[],
        )
        .await?;
    // One finding per sequence: the column that leaves the least room.
    let mut worst: BTreeMap<String, (f64, Finding)> = BTreeMap::new();
    for row in rows {
        let sequence: String = row.get("sequence_name");
        let data_type: String = row.get("data_type");
        let column_min: Option<i64> = row.get("column_min");
        let column_max: Option<i64> = row.get("column_max");
        let table: Option<String> = row.get("table_name");
        let column: Option<String> = row.get("column_name");
        let column_type: Option<String> = row.get("column_type");
        let seq = SequenceUse {
            last: row.get("last_value"),
            min: row.get("min_value"),
            max: row.get("max_value"),
            increment: row.get("increment_by"),
            column_bounds: column_min.zip(column_max),
        };
        let own = seq.sequence_share();
        let by_column = seq.column_share();
        let used = by_column.map_or(own, |c| c.max(own));
        let severity = if used >= t.sequence_critical {
            Severity::Critical
        } else if used >= t.sequence_warning {
            Severity::Warning
        } else {
            continue;
        };
        let feeds = match (&table, &column, &column_type) {
            (Some(table), Some(column), Some(column_type)) => {
                format!("; it feeds {table}.{column} ({column_type})")
            }
            _ => String::new(),
        };
        let limit = if increment_up(&seq) { seq.max } else { seq.min };
        let mut evidence = format!(
            "{sequence} ({data_type}) is at {} of {} ({} of its range used){feeds}",
            count(seq.last),
            count(limit),
            percent(own)
        );
        let column_limited = by_column.is_some_and(|c| c >= own);
        let mut fix = String::new();
        if let (true, Some(share), Some(table), Some(column), Some(column_type)) =
            (column_limited, by_column, &table, &column, &column_type)
        {
            let bound = if increment_up(&seq) {
                column_max
            } else {
                column_min
            };
            evidence.push_str(&format!(
                ", but {column_type} stops at {}: {} of the column's range is used",
                count(bound.unwrap_or(0)),
                percent(share)
            ));
            fix.push_str(&format!(
                "-- rewrites the table under an ACCESS EXCLUSIVE lock; on a large table add a bigint column,\n\
                 -- backfill it in batches and swap it in instead. Columns that reference it need the same change.\n\
                 ALTER TABLE {table} ALTER COLUMN {column} TYPE bigint;\n"
            ));
        } else if let (Some(table), Some(column), Some(column_type)) =
            (&table, &column, &column_type)
            && column_type != "bigint"
        {
            fix.push_str(&format!(
                "-- the column must hold the larger values too (this rewrites the table):\n\
                 ALTER TABLE {table} ALTER COLUMN {column} TYPE bigint;\n"
            ));
        }
        if !column_limited || data_type != "bigint" {
            fix.push_str(&format!(
                "ALTER SEQUENCE {sequence} AS bigint {} {};",
                if increment_up(&seq) {
                    "MAXVALUE"
                } else {
                    "MINVALUE"
                },
                if increment_up(&seq) {
                    "9223372036854775807"
                } else {
                    "-9223372036854775808"
                }
            ));
        }
        let finding = Finding {
            check: Check::SequenceExhaustion,
            severity,
            subject: sequence.clone(),
            evidence,
            why: "When a sequence, or the column it feeds, reaches its maximum, every INSERT that \
                  needs a new id fails (\"nextval: reached maximum value\" or \"integer out of range\") \
                  until the type is widened, and widening a large table takes time and a lock."
                .to_owned(),
            fix_sql: fix.trim_end().to_owned(),
        };
        let replace = worst.get(&sequence).is_none_or(|(prev, _)| used > *prev);
        if replace {
            worst.insert(sequence, (used, finding));
        }
    }
    Ok(worst.into_values().map(|(_, finding)| finding).collect())
}

fn increment_up(seq: &SequenceUse) -> bool {
    seq.increment >= 0
}

pub(super) async fn cache_hit(client: &Client, t: &Thresholds, since: Option<&str>) -> Found {
    let row = client
        .query_one(
            "SELECT coalesce(sum(heap_blks_hit), 0)::bigint AS heap_hit,
                    coalesce(sum(heap_blks_read), 0)::bigint AS heap_read,
                    coalesce(sum(idx_blks_hit), 0)::bigint AS idx_hit,
                    coalesce(sum(idx_blks_read), 0)::bigint AS idx_read,
                    current_setting('shared_buffers') AS shared_buffers,
                    pg_database_size(current_database()) AS database_size,
                    current_database()::text AS database
               FROM pg_statio_user_tables",
            &[],
        )
        .await?;
    let database: String = row.get("database");
    let shared_buffers: String = row.get("shared_buffers");
    let size: i64 = row.get("database_size");
    let since = since.map_or_else(String::new, |s| format!(" since {s}"));
    let mut found = Vec::new();
    for (what, hit, read) in [
        (
            "tables",
            row.get::<_, i64>("heap_hit"),
            row.get::<_, i64>("heap_read"),
        ),
        ("indexes", row.get("idx_hit"), row.get("idx_read")),
    ] {
        let total = hit + read;
        if total < t.cache_min_blocks {
            continue;
        }
        let ratio = hit as f64 / total as f64;
        if ratio >= t.cache_hit_ratio {
            continue;
        }
        found.push(Finding {
            check: Check::CacheHitRatio,
            severity: if ratio < CACHE_HIT_CRITICAL_RATIO {
                Severity::Critical
            } else {
                Severity::Warning
            },
            subject: format!("{what} of {database}"),
            evidence: format!(
                "{} of {} block reads of {what}{since} were served from shared buffers: {} hit \
                 (wanted at least {}); {} came from the OS cache or disk; shared_buffers is {shared_buffers}, \
                 the database takes {}",
                count(hit),
                count(total),
                percent(ratio),
                percent(t.cache_hit_ratio),
                count(read),
                bytes(size)
            ),
            why: "Blocks missing from shared buffers come from the operating system's cache at best \
                  and from disk at worst: an OLTP service whose working set does not fit in memory \
                  waits on I/O, and its latency follows the disk's."
                .to_owned(),
            fix_sql: "-- find the statements that read the most blocks (pg_stat_statements: shared_blks_read),\n\
                      -- add the indexes they lack, or give PostgreSQL more memory (about a quarter of RAM; needs a restart):\n\
                      -- ALTER SYSTEM SET shared_buffers = '<size>';"
                .to_owned(),
        });
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_turn_warning_then_critical() {
        assert_eq!(age_severity(100, 300, 1_000), None);
        assert_eq!(age_severity(300, 300, 1_000), Some(Severity::Warning));
        assert_eq!(age_severity(1_000, 300, 1_000), Some(Severity::Critical));
    }

    #[test]
    fn a_bigint_sequence_feeding_an_integer_column_is_judged_by_the_column() {
        let seq = SequenceUse {
            last: 2_000_000_000,
            min: 1,
            max: i64::MAX,
            increment: 1,
            column_bounds: Some((-2_147_483_648, 2_147_483_647)),
        };
        assert!(seq.sequence_share() < 0.001);
        let column = seq.column_share().unwrap();
        assert!((column - 0.9313).abs() < 0.001, "{column}");
        let bigint_column = SequenceUse {
            column_bounds: None,
            ..seq.clone()
        };
        assert_eq!(bigint_column.column_share(), None);
    }

    #[test]
    fn descending_sequences_use_their_range_downwards() {
        let seq = SequenceUse {
            last: -2_000_000_000,
            min: i64::MIN,
            max: -1,
            increment: -1,
            column_bounds: Some((-2_147_483_648, 2_147_483_647)),
        };
        let column = seq.column_share().unwrap();
        assert!((column - 0.9313).abs() < 0.001, "{column}");
    }

    #[test]
    fn autovacuum_off_values() {
        for v in ["false", "OFF", "0", "no"] {
            assert!(off(v), "{v}");
        }
        for v in ["true", "on", "1"] {
            assert!(!off(v), "{v}");
        }
    }
}
