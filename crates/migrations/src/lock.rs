//! The migration lock: a session-level advisory lock on the migrator's own
//! connection, the same key sqlx-cli uses, so pgstack and sqlx-cli exclude
//! each other.
//!
//! The lock is polled with `pg_try_advisory_lock` rather than awaited with
//! `pg_advisory_lock`: a session blocked inside `pg_advisory_lock` holds a
//! snapshot, and `CREATE INDEX CONCURRENTLY` run by the lock holder would wait
//! for that snapshot forever (a deadlock). Polling also lets the migrator say
//! who holds the lock and give up after the lock timeout.

use std::fmt;
use std::time::{Duration, Instant, SystemTime};

use sqlx::PgConnection;

use crate::error::{Error, Result, db};
use crate::progress::{Event, Observer};

/// The session holding the migration lock.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LockHolder {
    /// The server process id of the holding session.
    pub pid: i32,
    /// Its `application_name`.
    pub application_name: String,
    /// Its client address, when it connected over TCP.
    pub client_addr: Option<String>,
    /// When its session started (the lock cannot be older).
    pub session_start: Option<SystemTime>,
    /// Its state (`idle`, `active`, …).
    pub state: Option<String>,
}

impl fmt::Display for LockHolder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {}", self.pid)?;
        if !self.application_name.is_empty() {
            write!(f, " ({:?})", self.application_name)?;
        }
        if let Some(addr) = &self.client_addr {
            write!(f, " from {addr}")?;
        }
        if let Some(start) = self.session_start {
            write!(
                f,
                ", connected since {}",
                humantime::format_rfc3339_seconds(start)
            )?;
        }
        if let Some(state) = &self.state {
            write!(f, ", {state}")?;
        }
        Ok(())
    }
}

/// The advisory lock key for a database: sqlx's `generate_lock_id`.
pub(crate) fn lock_id(database_name: &str) -> i64 {
    const CRC_IEEE: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);
    0x3d32ad9e_i64.wrapping_mul(i64::from(CRC_IEEE.checksum(database_name.as_bytes())))
}

const FIRST_POLL: Duration = Duration::from_millis(10);
const MAX_POLL: Duration = Duration::from_millis(200);
const REPORT_EVERY: Duration = Duration::from_secs(5);

/// Takes the lock on `conn`, waiting at most `timeout`.
pub(crate) async fn acquire(
    conn: &mut PgConnection,
    key: i64,
    timeout: Duration,
    observer: &Observer,
) -> Result<Duration> {
    let start = Instant::now();
    let mut poll = FIRST_POLL;
    let mut last_report: Option<Instant> = None;
    loop {
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(key)
            .fetch_one(&mut *conn)
            .await
            .map_err(db("taking the migration lock"))?;
        let waited = start.elapsed();
        if got {
            if last_report.is_some() {
                tracing::info!(waited = ?waited, "migration lock acquired");
            } else {
                tracing::debug!("migration lock acquired");
            }
            metrics::histogram!("pgstack_migration_lock_wait_seconds").record(waited.as_secs_f64());
            observer.emit(&Event::LockAcquired { waited });
            return Ok(waited);
        }
        if waited >= timeout {
            let holder = holder(conn, key).await?;
            tracing::warn!(waited = ?waited, holder = ?holder, "gave up waiting for the migration lock");
            return Err(Error::LockTimeout { waited, holder });
        }
        if last_report.is_none_or(|t| t.elapsed() >= REPORT_EVERY) {
            let holder = holder(conn, key).await?;
            match &holder {
                Some(h) => {
                    tracing::info!(holder = %h, waited = ?waited, "waiting for the migration lock")
                }
                None => tracing::info!(waited = ?waited, "waiting for the migration lock"),
            }
            observer.emit(&Event::LockWaiting { holder, waited });
            last_report = Some(Instant::now());
        }
        let left = timeout.saturating_sub(start.elapsed());
        tokio::time::sleep(poll.min(left)).await;
        poll = (poll * 2).min(MAX_POLL);
    }
}

/// Releases the lock taken by [`acquire`].
pub(crate) async fn release(conn: &mut PgConnection, key: i64) -> Result<()> {
    let _released: bool = sqlx::query_scalar("SELECT pg_advisory_unlock($1)")
        .bind(key)
        .fetch_one(&mut *conn)
        .await
        .map_err(db("releasing the migration lock"))?;
    Ok(())
}

type HolderRow = (
    i32,
    Option<String>,
    Option<String>,
    Option<f64>,
    Option<String>,
);

/// Who holds the lock, from `pg_locks` and `pg_stat_activity`.
pub(crate) async fn holder(conn: &mut PgConnection, key: i64) -> Result<Option<LockHolder>> {
    // A bigint advisory key is stored as classid = high 32 bits,
    // objid = low 32 bits, objsubid = 1.
    let row: Option<HolderRow> = sqlx::query_as(
        "SELECT a.pid, a.application_name, host(a.client_addr), \
                    extract(epoch FROM a.backend_start)::float8, a.state \
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND l.granted \
               AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
               AND l.classid = (($1::bigint >> 32) & 4294967295)::oid \
               AND l.objid = ($1::bigint & 4294967295)::oid \
               AND l.objsubid = 1 \
             LIMIT 1",
    )
    .bind(key)
    .fetch_optional(&mut *conn)
    .await
    .map_err(db("looking up the holder of the migration lock"))?;
    Ok(row.map(
        |(pid, application_name, client_addr, start, state)| LockHolder {
            pid,
            application_name: application_name.unwrap_or_default(),
            client_addr,
            session_start: start
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs_f64(s)),
            state,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::lock_id;

    #[test]
    fn lock_id_matches_sqlx() {
        // sqlx computes 0x3d32ad9e * crc32(name); "postgres" has CRC-32 0x156A8775 (zlib.crc32).
        let expected = 0x3d32ad9e_i64 * 0x156a_8775_i64;
        assert_eq!(lock_id("postgres"), expected);
    }
}
