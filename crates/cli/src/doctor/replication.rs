//! Replication checks: slots that hold WAL, and replicas behind their
//! primary, seen from the primary (`pg_stat_replication`) and from the
//! replica itself.

use pgstack_pool::tokio_postgres::Client;

use super::{
    CRITICAL_FACTOR, Check, Finding, Found, Severity, Thresholds, bytes, count, literal, seconds,
};

pub(super) async fn slots(client: &Client, t: &Thresholds) -> Found {
    let rows = client
        .query(
            "SELECT slot_name::text, slot_type, database::text, active, wal_status,
                    pg_wal_lsn_diff(
                        CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn()
                             ELSE pg_current_wal_lsn() END,
                        restart_lsn)::bigint AS retained,
                    age(xmin)::bigint AS xmin_age, age(catalog_xmin)::bigint AS catalog_xmin_age,
                    restart_lsn::text
               FROM pg_replication_slots
              ORDER BY slot_name",
            &[],
        )
        .await?;
    let mut found = Vec::new();
    for row in rows {
        let name: String = row.get("slot_name");
        let kind: String = row.get("slot_type");
        let active: bool = row.get("active");
        let wal_status: Option<String> = row.get("wal_status");
        let retained: Option<i64> = row.get("retained");
        let xmin_age: Option<i64> = row.get("xmin_age");
        let catalog_xmin_age: Option<i64> = row.get("catalog_xmin_age");
        let lost = matches!(wal_status.as_deref(), Some("lost" | "unreserved"));
        let heavy = retained.is_some_and(|r| r >= t.slot_retained_bytes);
        if active && !lost && !heavy {
            continue;
        }
        let mut evidence = format!(
            "{kind} slot {name}{} is {}; it holds {} of WAL since {} (wal_status {})",
            row.get::<_, Option<String>>("database")
                .map_or_else(String::new, |db| format!(" (database {db})")),
            if active { "active" } else { "inactive" },
            retained.map_or_else(|| "an unknown amount".to_owned(), bytes),
            row.get::<_, Option<String>>("restart_lsn")
                .unwrap_or_else(|| "?".to_owned()),
            wal_status.as_deref().unwrap_or("?")
        );
        for (what, age) in [("xmin", xmin_age), ("catalog_xmin", catalog_xmin_age)] {
            if let Some(age) = age {
                evidence.push_str(&format!(
                    "; its {what} holds back vacuum by {} transactions",
                    count(age)
                ));
            }
        }
        evidence.push_str(&format!(
            "; critical from {} retained",
            bytes(t.slot_retained_bytes)
        ));
        found.push(Finding {
            check: Check::ReplicationSlot,
            severity: if lost || heavy {
                Severity::Critical
            } else {
                Severity::Warning
            },
            subject: format!("slot {name}"),
            evidence,
            why: "A replication slot keeps every WAL segment its consumer has not confirmed, and \
                  (with xmin or catalog_xmin) every row version that consumer might still need. A \
                  slot whose consumer is gone or behind fills the WAL disk until the server stops, \
                  and blocks vacuum meanwhile; a `lost` slot can no longer serve its consumer at all."
                .to_owned(),
            fix_sql: format!(
                "-- if its consumer is gone for good:\n\
                 SELECT pg_drop_replication_slot({});\n\
                 -- and cap what any slot may hold:\n\
                 ALTER SYSTEM SET max_slot_wal_keep_size = '10GB';\n\
                 SELECT pg_reload_conf();",
                literal(&name)
            ),
        });
    }
    Ok(found)
}

/// The severity of a lag of `bytes` and `secs` against the thresholds.
pub(super) fn lag_severity(bytes: i64, secs: Option<f64>, t: &Thresholds) -> Option<Severity> {
    let factor = i64::from(CRITICAL_FACTOR);
    let limit = t.replica_lag.as_secs_f64();
    let critical = bytes >= t.replica_lag_bytes.saturating_mul(factor)
        || secs.is_some_and(|s| s >= limit * f64::from(CRITICAL_FACTOR));
    let warning = bytes >= t.replica_lag_bytes || secs.is_some_and(|s| s >= limit);
    if critical {
        Some(Severity::Critical)
    } else if warning {
        Some(Severity::Warning)
    } else {
        None
    }
}

/// On a primary: every standby in `pg_stat_replication`.
pub(super) async fn standbys(client: &Client, t: &Thresholds) -> Found {
    let rows = client
        .query(
            "SELECT coalesce(nullif(application_name, ''), 'pid ' || pid) AS name,
                    client_addr::text, state, sync_state,
                    pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint AS replay_bytes,
                    pg_wal_lsn_diff(pg_current_wal_lsn(), flush_lsn)::bigint AS flush_bytes,
                    EXTRACT(EPOCH FROM replay_lag)::float8 AS replay_secs
               FROM pg_stat_replication
              ORDER BY 1",
            &[],
        )
        .await?;
    let mut found = Vec::new();
    for row in rows {
        let name: String = row.get("name");
        let replay_bytes: Option<i64> = row.get("replay_bytes");
        let replay_secs: Option<f64> = row.get("replay_secs");
        let Some(severity) = lag_severity(replay_bytes.unwrap_or(0), replay_secs, t) else {
            continue;
        };
        let addr: Option<String> = row.get("client_addr");
        let state: Option<String> = row.get("state");
        let sync: Option<String> = row.get("sync_state");
        let flush_bytes: Option<i64> = row.get("flush_bytes");
        found.push(Finding {
            check: Check::ReplicationLag,
            severity,
            subject: format!("standby {name}"),
            evidence: format!(
                "standby {name} ({}, {}, {}) has replayed up to {} behind this primary's WAL \
                 (received and flushed up to {} behind); replay lag {}; warning from {} or {}",
                addr.as_deref().unwrap_or("local"),
                state.as_deref().unwrap_or("?"),
                sync.as_deref().unwrap_or("?"),
                replay_bytes.map_or_else(|| "?".to_owned(), bytes),
                flush_bytes.map_or_else(|| "?".to_owned(), bytes),
                replay_secs.map_or_else(|| "unknown".to_owned(), seconds),
                bytes(t.replica_lag_bytes),
                seconds(t.replica_lag.as_secs_f64())
            ),
            why: why_lag(),
            fix_sql: fix_lag(),
        });
    }
    Ok(found)
}

/// On a replica (`name` labels it): replay behind what it received, and a
/// paused replay. Nothing on a primary.
pub(super) async fn replica_lag(client: &Client, name: &str, t: &Thresholds) -> Found {
    let row = client
        .query_one(
            "SELECT pg_is_in_recovery() AS replica,
                    CASE WHEN pg_is_in_recovery() THEN
                        pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())::bigint END AS behind,
                    CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() END AS paused,
                    CASE WHEN pg_is_in_recovery()
                          AND pg_last_wal_receive_lsn() IS DISTINCT FROM pg_last_wal_replay_lsn()
                         THEN EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp())::float8
                    END AS secs",
            &[],
        )
        .await?;
    let replica: bool = row.get("replica");
    if !replica {
        return Ok(Vec::new());
    }
    let behind: i64 = row.get::<_, Option<i64>>("behind").unwrap_or(0);
    let paused: bool = row.get::<_, Option<bool>>("paused").unwrap_or(false);
    let secs: Option<f64> = row.get("secs");
    let Some(severity) = lag_severity(behind, secs, t) else {
        return Ok(Vec::new());
    };
    let mut fix = fix_lag();
    if paused {
        fix = format!("-- on the replica: replay is paused\nSELECT pg_wal_replay_resume();\n{fix}");
    }
    Ok(vec![Finding {
        check: Check::ReplicationLag,
        severity,
        subject: format!("replica {name}"),
        evidence: format!(
            "replica {name} has received {} of WAL it has not replayed yet{}; its last replayed \
             transaction is {} old; warning from {} or {}",
            bytes(behind),
            if paused { " (replay is paused)" } else { "" },
            secs.map_or_else(|| "?".to_owned(), seconds),
            bytes(t.replica_lag_bytes),
            seconds(t.replica_lag.as_secs_f64())
        ),
        why: why_lag(),
        fix_sql: fix,
    }])
}

fn why_lag() -> String {
    "Reads routed to a lagging replica return old data (pgstack stops routing to a replica past \
     health.max_replica_lag), a failover to it loses or delays what it has not replayed, and the \
     primary keeps the WAL it still needs."
        .to_owned()
}

fn fix_lag() -> String {
    "-- on the replica: is replay waiting on a conflict or a long query, or is its disk or CPU saturated?\n\
     SELECT pid, state, wait_event_type, wait_event, query FROM pg_stat_activity WHERE backend_type = 'startup' OR state = 'active';\n\
     -- on the primary: is the network keeping up (write/flush vs replay)?\n\
     SELECT application_name, state, write_lag, flush_lag, replay_lag FROM pg_stat_replication;"
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn lag_is_judged_by_bytes_or_time_and_critical_at_ten_times() {
        let t = Thresholds {
            replica_lag_bytes: 1_000,
            replica_lag: Duration::from_secs(10),
            ..Thresholds::default()
        };
        assert_eq!(lag_severity(999, Some(9.0), &t), None);
        assert_eq!(lag_severity(1_000, None, &t), Some(Severity::Warning));
        assert_eq!(lag_severity(0, Some(10.0), &t), Some(Severity::Warning));
        assert_eq!(lag_severity(10_000, None, &t), Some(Severity::Critical));
        assert_eq!(lag_severity(0, Some(100.0), &t), Some(Severity::Critical));
    }
}
