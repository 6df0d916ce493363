//! Lock-safe migrations: each migration waits at most `lock_wait` for a
//! lock (PostgreSQL's `lock_timeout`), and one that gives up (SQLSTATE
//! `55P03`) is rolled back and tried again after a backoff.
//!
//! A statement waiting for a lock sits in the table's lock queue, and every
//! later statement whose lock conflicts with the one it waits for queues
//! behind it: an `ALTER TABLE` waiting for a long transaction to end stops
//! every `SELECT` of the table meanwhile. Bounding the wait bounds that
//! outage; retrying lets the migration through once the table is quiet.
//!
//! While a migration runs longer than half of `lock_wait`, a second
//! connection looks every half `lock_wait` at what the migrator's session
//! waits for (`pg_locks`) and who holds it up (`pg_blocking_pids`,
//! `pg_stat_activity`), so the retry events and the final error can say.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use pgstack_config::Jitter;
use pgstack_resilience::Backoff;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};
use tokio::sync::Notify;

/// SQLSTATE `lock_not_available`: a lock wait gave up (`lock_timeout`,
/// `NOWAIT`).
pub(crate) const LOCK_NOT_AVAILABLE: &str = "55P03";

/// The backoff between attempts of a migration that could not take its
/// locks: 1 s doubling up to 30 s, with equal jitter (half the delay fixed,
/// half random), so migrators retrying at once spread out.
pub(crate) fn default_backoff() -> Backoff {
    Backoff::new(
        Duration::from_secs(1),
        Duration::from_secs(30),
        2.0,
        Jitter::Equal,
    )
}

/// Whether `error` is PostgreSQL's `lock_not_available`.
pub(crate) fn is_lock_not_available(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c == LOCK_NOT_AVAILABLE)
}

/// `lock_timeout` in whole milliseconds (at least 1; PostgreSQL's limit at
/// most), or `None` for a zero wait (no timeout).
pub(crate) fn timeout_ms(wait: Duration) -> Option<u64> {
    if wait.is_zero() {
        return None;
    }
    let ms = wait.as_nanos().div_ceil(1_000_000);
    Some(
        u64::try_from(ms)
            .unwrap_or(u64::MAX)
            .clamp(1, i32::MAX as u64),
    )
}

/// The lock a migration waited for, and the sessions that held it up.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LockConflict {
    /// The kind of lock (`pg_locks.locktype`: `relation`, `tuple`,
    /// `transactionid`, …).
    pub locktype: String,
    /// The mode asked for (`AccessExclusiveLock`, …).
    pub mode: String,
    /// The relation, for a relation lock (`bills`, `audit.events`).
    pub relation: Option<String>,
    /// The sessions holding a conflicting lock or queued ahead for one
    /// (`pg_blocking_pids`), longest-running transaction first; at most five.
    pub blockers: Vec<Blocker>,
}

/// A session that held up a migration's lock.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Blocker {
    /// Its server process id.
    pub pid: i32,
    /// Its `application_name`.
    pub application_name: String,
    /// Its state (`active`, `idle in transaction`, …).
    pub state: Option<String>,
    /// Its current (or, when idle, last) query, whitespace collapsed and cut
    /// to 200 characters.
    pub query: Option<String>,
    /// How long its transaction had been open.
    pub transaction_age: Option<Duration>,
}

impl fmt::Display for Blocker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {}", self.pid)?;
        if !self.application_name.is_empty() {
            write!(f, " ({:?})", self.application_name)?;
        }
        if let Some(state) = &self.state {
            write!(f, ", {state}")?;
        }
        if let Some(age) = self.transaction_age {
            let age = Duration::from_secs(age.as_secs());
            write!(
                f,
                ", transaction open for {}",
                humantime::format_duration(age)
            )?;
        }
        if let Some(query) = &self.query {
            write!(f, ", query: {query}")?;
        }
        Ok(())
    }
}

impl fmt::Display for LockConflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} on ", self.mode)?;
        match &self.relation {
            Some(relation) => write!(f, "table {relation}")?,
            None => write!(f, "a {} lock", self.locktype)?,
        }
        let mut blockers = self.blockers.iter();
        match blockers.next() {
            Some(first) => write!(f, ", held up by {first}")?,
            None => f.write_str(", held up by a session that had gone when looked for")?,
        }
        let more = blockers.count();
        if more > 0 {
            write!(f, " (and {more} more)")?;
        }
        Ok(())
    }
}

type ConflictRow = (
    String,
    String,
    Option<String>,
    Option<i32>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<f64>,
);

/// What `pid` waits for and who holds it up; `None` when it waits for no
/// lock.
async fn observe(conn: &mut PgConnection, pid: i32) -> Result<Option<LockConflict>, sqlx::Error> {
    let rows: Vec<ConflictRow> = sqlx::query_as(
        "SELECT l.locktype, l.mode, \
                CASE WHEN l.relation IS NOT NULL THEN l.relation::regclass::text END, \
                b.pid, b.application_name, b.state, left(b.query, 400), \
                extract(epoch FROM now() - b.xact_start)::float8 \
         FROM pg_locks l \
         LEFT JOIN LATERAL unnest(pg_blocking_pids(l.pid)) AS bp(pid) ON true \
         LEFT JOIN pg_stat_activity b ON b.pid = bp.pid \
         WHERE l.pid = $1 AND NOT l.granted \
         ORDER BY b.xact_start NULLS LAST \
         LIMIT 5",
    )
    .bind(pid)
    .fetch_all(&mut *conn)
    .await?;
    let mut conflict: Option<LockConflict> = None;
    for (locktype, mode, relation, bpid, app, state, query, age) in rows {
        let c = conflict.get_or_insert_with(|| LockConflict {
            locktype,
            mode,
            relation,
            blockers: Vec::new(),
        });
        if let Some(pid) = bpid {
            c.blockers.push(Blocker {
                pid,
                application_name: app.unwrap_or_default(),
                state,
                query: query.map(|q| collapse(&q, 200)),
                transaction_age: age
                    .filter(|s| s.is_finite() && *s >= 0.0)
                    .map(Duration::from_secs_f64),
            });
        }
    }
    Ok(conflict)
}

fn collapse(text: &str, max: usize) -> String {
    let joined = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if joined.chars().count() <= max {
        return joined;
    }
    let cut: String = joined.chars().take(max).collect();
    format!("{cut}…")
}

/// Watches the migrator's session for lock waits while a migration runs,
/// on a connection of its own opened on first need.
pub(crate) struct Watch {
    connect: PgConnectOptions,
    conn: Option<PgConnection>,
    /// The migrator's session.
    pid: i32,
    every: Duration,
    /// Connecting failed once: do not try again in this run.
    gave_up: bool,
}

impl Watch {
    /// A watch of session `pid`, looking every half `lock_wait` (at least
    /// every 20 ms). Its own session is named after the migrator's, with
    /// ` (lock watch)` added, so it is not mistaken for the migrator.
    pub(crate) fn new(connect: PgConnectOptions, pid: i32, lock_wait: Duration) -> Self {
        let name = format!(
            "{} (lock watch)",
            connect
                .get_application_name()
                .unwrap_or("pgstack-migrations")
        );
        Watch {
            connect: connect.application_name(&name),
            conn: None,
            pid,
            every: (lock_wait / 2).max(Duration::from_millis(20)),
            gave_up: false,
        }
    }

    /// Runs `work`, looking at the session's lock waits meanwhile. Returns
    /// its output and the last lock wait seen, if any.
    pub(crate) async fn during<T>(
        &mut self,
        work: impl Future<Output = T>,
    ) -> (T, Option<LockConflict>) {
        let done = Notify::new();
        let work = async {
            let out = work.await;
            done.notify_one();
            out
        };
        tokio::join!(work, self.poll(&done))
    }

    async fn poll(&mut self, done: &Notify) -> Option<LockConflict> {
        let mut seen = None;
        loop {
            tokio::select! {
                biased;
                () = done.notified() => return seen,
                () = tokio::time::sleep(self.every) => {}
            }
            if let Some(conflict) = self.look().await {
                seen = Some(conflict);
            }
        }
    }

    async fn look(&mut self) -> Option<LockConflict> {
        if self.gave_up {
            return None;
        }
        if self.conn.is_none() {
            match PgConnection::connect_with(&self.connect).await {
                Ok(conn) => self.conn = Some(conn),
                Err(e) => {
                    tracing::debug!(error = %e, "cannot open the lock watch connection; lock waits will not name their blocker");
                    self.gave_up = true;
                    return None;
                }
            }
        }
        let conn = self.conn.as_mut()?;
        match observe(conn, self.pid).await {
            Ok(conflict) => conflict,
            Err(e) => {
                tracing::debug!(error = %e, "looking at the migrator's lock waits failed");
                if let Some(conn) = self.conn.take() {
                    let _ = conn.close().await;
                }
                None
            }
        }
    }

    /// Closes the watch connection, if one was opened.
    pub(crate) async fn close(&mut self) {
        if let Some(conn) = self.conn.take()
            && let Err(e) = conn.close().await
        {
            tracing::debug!(error = %e, "closing the lock watch connection failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_timeout_is_whole_milliseconds_within_postgres_limits() {
        assert_eq!(timeout_ms(Duration::ZERO), None);
        assert_eq!(timeout_ms(Duration::from_micros(10)), Some(1));
        assert_eq!(timeout_ms(Duration::from_micros(1500)), Some(2));
        assert_eq!(timeout_ms(Duration::from_secs(5)), Some(5000));
        assert_eq!(
            timeout_ms(Duration::from_secs(u64::MAX)),
            Some(i32::MAX as u64)
        );
    }

    #[test]
    fn a_conflict_reads_as_a_sentence() {
        let conflict = LockConflict {
            locktype: "relation".to_owned(),
            mode: "AccessExclusiveLock".to_owned(),
            relation: Some("bills".to_owned()),
            blockers: vec![
                Blocker {
                    pid: 4242,
                    application_name: "reports".to_owned(),
                    state: Some("idle in transaction".to_owned()),
                    query: Some(collapse("SELECT *\n  FROM bills", 200)),
                    transaction_age: Some(Duration::from_millis(192_400)),
                },
                Blocker {
                    pid: 4243,
                    application_name: String::new(),
                    state: None,
                    query: None,
                    transaction_age: None,
                },
            ],
        };
        assert_eq!(
            conflict.to_string(),
            "AccessExclusiveLock on table bills, held up by pid 4242 (\"reports\"), idle in \
             transaction, transaction open for 3m 12s, query: SELECT * FROM bills (and 1 more)"
        );
        assert_eq!(collapse("abcdef", 3), "abc…");
    }
}
