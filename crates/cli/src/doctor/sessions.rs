//! Session checks: idle in transaction, long-running statements, and how
//! full the server's connection table is.

use pgstack_pool::tokio_postgres::{Client, Row};

use super::{
    CONNECTIONS_CRITICAL_RATIO, CRITICAL_FACTOR, Check, Finding, Found, Severity, Thresholds,
    count, percent, seconds, statement,
};

/// Who a session is, for evidence: `pid 1234 (user app, application "api", from 10.0.0.7)`.
fn who(row: &Row) -> String {
    let pid: i32 = row.get("pid");
    let user: Option<String> = row.get("usename");
    let app: Option<String> = row.get("application_name");
    let addr: Option<String> = row.get("client_addr");
    let mut text = format!("pid {pid} (user {}", user.as_deref().unwrap_or("?"));
    if let Some(app) = app.filter(|a| !a.is_empty()) {
        text.push_str(&format!(", application \"{app}\""));
    }
    match addr {
        Some(addr) => text.push_str(&format!(", from {addr})")),
        None => text.push_str(", local)"),
    }
    text
}

fn severity(secs: f64, threshold: std::time::Duration) -> Severity {
    if secs >= threshold.as_secs_f64() * f64::from(CRITICAL_FACTOR) {
        Severity::Critical
    } else {
        Severity::Warning
    }
}

/// The columns every session query selects.
const SESSION_COLUMNS: &str = "pid, usename::text, application_name, client_addr::text, query, \
     EXTRACT(EPOCH FROM now() - state_change)::float8 AS in_state, \
     EXTRACT(EPOCH FROM now() - xact_start)::float8 AS in_transaction, \
     EXTRACT(EPOCH FROM now() - query_start)::float8 AS in_query, \
     age(backend_xmin)::bigint AS xmin_age";

pub(super) async fn idle_in_transaction(client: &Client, t: &Thresholds) -> Found {
    let sql = format!(
        "SELECT {SESSION_COLUMNS}, state FROM pg_stat_activity
          WHERE datname = current_database() AND pid <> pg_backend_pid()
            AND state IN ('idle in transaction', 'idle in transaction (aborted)')
            AND now() - state_change >= make_interval(secs => $1)
          ORDER BY state_change"
    );
    let threshold = t.idle_in_transaction.as_secs_f64();
    let rows = client.query(&sql, &[&threshold]).await?;
    let database: String = client
        .query_one("SELECT current_database()::text", &[])
        .await?
        .get(0);
    Ok(rows
        .iter()
        .map(|row| {
            let pid: i32 = row.get("pid");
            let idle: f64 = row.get("in_state");
            let open: Option<f64> = row.get("in_transaction");
            let state: String = row.get("state");
            let query: Option<String> = row.get("query");
            let xmin_age: Option<i64> = row.get("xmin_age");
            let mut evidence = format!(
                "{} has been {state} for {}; its transaction has been open for {}; last statement: {}",
                who(row),
                seconds(idle),
                open.map_or_else(|| "?".to_owned(), seconds),
                statement(query.as_deref())
            );
            if let Some(age) = xmin_age {
                evidence.push_str(&format!(
                    "; it holds back vacuum's horizon by {} transactions",
                    count(age)
                ));
            }
            Finding {
                check: Check::IdleInTransaction,
                severity: severity(idle, t.idle_in_transaction),
                subject: format!("session {pid}"),
                evidence,
                why: "A transaction left open keeps its locks (blocking DDL and anyone who needs them) \
                      and its snapshot: vacuum cannot remove any row deleted after it began, in any \
                      table, so bloat grows until it ends. It is usually an application that forgot \
                      to commit or roll back, or a connection held across a slow call."
                    .to_owned(),
                fix_sql: format!(
                    "SELECT pg_terminate_backend({pid});\n\
                     -- and end such sessions automatically from now on:\n\
                     ALTER DATABASE {} SET idle_in_transaction_session_timeout = '5min';",
                    quote(&database)
                ),
            }
        })
        .collect())
}

pub(super) async fn long_running(client: &Client, t: &Thresholds) -> Found {
    let sql = format!(
        "SELECT {SESSION_COLUMNS} FROM pg_stat_activity
          WHERE datname = current_database() AND pid <> pg_backend_pid()
            AND backend_type = 'client backend' AND state = 'active'
            AND now() - query_start >= make_interval(secs => $1)
          ORDER BY query_start"
    );
    let threshold = t.long_query.as_secs_f64();
    let rows = client.query(&sql, &[&threshold]).await?;
    Ok(rows
        .iter()
        .map(|row| {
            let pid: i32 = row.get("pid");
            let running: f64 = row.get("in_query");
            let query: Option<String> = row.get("query");
            Finding {
                check: Check::LongRunningQuery,
                severity: severity(running, t.long_query),
                subject: format!("session {pid}"),
                evidence: format!(
                    "{} has been running one statement for {}: {}",
                    who(row),
                    seconds(running),
                    statement(query.as_deref())
                ),
                why: "A long statement holds its locks and its snapshot for as long as it runs: it can \
                      block migrations and other writers, and vacuum cannot clean up behind it. In an \
                      OLTP service it is usually a missing index, a runaway report or a lock wait."
                    .to_owned(),
                fix_sql: format!(
                    "SELECT pg_cancel_backend({pid});  -- or pg_terminate_backend({pid}) if it ignores the cancel\n\
                     -- and bound statements from now on (pgstack's query.statement_timeout does this per service):\n\
                     -- ALTER ROLE <role> SET statement_timeout = '30s';"
                ),
            }
        })
        .collect())
}

pub(super) async fn connections(client: &Client, t: &Thresholds) -> Found {
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE backend_type = 'client backend') AS used,
                    count(*) FILTER (WHERE backend_type = 'client backend' AND state = 'active') AS active,
                    count(*) FILTER (WHERE backend_type = 'client backend' AND state = 'idle') AS idle,
                    count(*) FILTER (WHERE backend_type = 'client backend'
                                     AND state LIKE 'idle in transaction%') AS idle_in_transaction,
                    current_setting('max_connections')::int AS max,
                    current_setting('superuser_reserved_connections')::int AS reserved
               FROM pg_stat_activity",
            &[],
        )
        .await?;
    let used: i64 = row.get("used");
    let max: i32 = row.get("max");
    let reserved: i32 = row.get("reserved");
    let usable = i64::from((max - reserved).max(1));
    let share = used as f64 / usable as f64;
    if share < t.connections_ratio {
        return Ok(Vec::new());
    }
    let top: Vec<String> = client
        .query(
            "SELECT coalesce(nullif(application_name, ''), '(none)') || ' ' || count(*)
               FROM pg_stat_activity WHERE backend_type = 'client backend'
              GROUP BY application_name ORDER BY count(*) DESC LIMIT 5",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(vec![Finding {
        check: Check::Connections,
        severity: if share >= CONNECTIONS_CRITICAL_RATIO {
            Severity::Critical
        } else {
            Severity::Warning
        },
        subject: "server connections".to_owned(),
        evidence: format!(
            "{} client connections of {} usable (max_connections {max} minus {reserved} reserved): {}; \
             {} active, {} idle, {} idle in transaction; by application: {}",
            count(used),
            count(usable),
            percent(share),
            count(row.get("active")),
            count(row.get("idle")),
            count(row.get("idle_in_transaction")),
            top.join(", ")
        ),
        why: "When the table is full, new connections fail with \"too many clients\" (SQLSTATE 53300) \
              and services cannot even report their health. Each connection also costs server memory \
              whether it works or idles."
            .to_owned(),
        fix_sql: format!(
            "-- lower the pools' sizes (pool.max_size) or put PgBouncer in front; idle connections are the cheap ones to shed:\n\
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity\n \
             WHERE backend_type = 'client backend' AND state = 'idle' AND now() - state_change > interval '10 minutes';\n\
             -- or raise the limit (needs a restart): ALTER SYSTEM SET max_connections = {};",
            max.saturating_mul(2)
        ),
    }])
}

/// An identifier for `ALTER DATABASE`.
fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
