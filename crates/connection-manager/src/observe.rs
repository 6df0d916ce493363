//! What a node says about itself: its role and where it stands in the WAL.
//!
//! The one definition of both. The cluster (discovery, shared connections,
//! the replication probe), the health monitor's probes and the
//! orchestrator's status all ask with [`observe`] or [`observe_replica`] and
//! read the answer with [`Observation::role`] and [`Observation::lag`], so a
//! read-only primary is a replica everywhere, not only for routing.
//!
//! One statement, sent with the simple protocol: it runs behind PgBouncer in
//! transaction mode and on connections without a statement cache.

use std::time::Duration;

use pgstack_pool::PooledConnection;
use tokio_postgres::SimpleQueryMessage;

use crate::node::{Node, Role};
use crate::route::WalPosition;

/// The statement behind [`observe`]: recovery, `transaction_read_only`,
/// the current WAL position (only outside recovery, where
/// `pg_current_wal_lsn()` fails), the last replayed position and the age in
/// seconds of the last replayed transaction (both `NULL` on a primary), and
/// the server's identity: its system identifier and start time.
pub const OBSERVE_QUERY: &str = "SELECT pg_is_in_recovery(), \
     current_setting('transaction_read_only'), \
     CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn()::text END, \
     pg_last_wal_replay_lsn()::text, \
     extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8::text, \
     (SELECT system_identifier FROM pg_control_system())::text || '@' \
       || pg_postmaster_start_time()::text";

/// How long [`observe_replica`] waits before it looks again at a replica
/// seen behind: a record written just before the primary was asked is
/// normally replayed within milliseconds, and should not count as lag.
pub const LOOK_AGAIN_AFTER: Duration = Duration::from_millis(50);

/// The lag reported for a replica that is behind and has not replayed a
/// transaction yet: as far behind as it gets.
const NOTHING_REPLAYED: Duration = Duration::from_secs(u32::MAX as u64);

/// What one [`observe`] saw on a node.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct Observation {
    /// `pg_is_in_recovery()`: the node is a standby.
    pub in_recovery: bool,
    /// `transaction_read_only` of the session: new transactions cannot write
    /// (for example `default_transaction_read_only = on`).
    pub read_only: bool,
    /// `pg_current_wal_lsn()`, when the node is not in recovery.
    pub wal_position: Option<WalPosition>,
    /// `pg_last_wal_replay_lsn()`: the last WAL position replayed, when in
    /// recovery.
    pub replay_position: Option<WalPosition>,
    /// How long ago the last replayed transaction committed on the primary
    /// (`now() - pg_last_xact_replay_timestamp()`, never negative); `None`
    /// before the first replayed transaction, and on a primary.
    pub replay_age: Option<Duration>,
    /// A fingerprint of the server that answered (its system identifier and
    /// start time): another value means another server behind the same
    /// address, or the same one restarted or rebuilt, whose replay
    /// positions are not comparable with those seen before.
    pub identity: Option<u64>,
}

/// A replica's lag behind a position of the primary.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReplicaLag {
    /// Bytes of WAL between the primary's position and the replayed one
    /// (0 when replayed up to it or past it); `None` when either is unknown.
    pub bytes: Option<u64>,
    /// Zero when caught up, else the age of the last replayed transaction
    /// (behind with none replayed yet: about 136 years); `None` when the
    /// bytes are unknown.
    pub time: Option<Duration>,
}

/// Why [`observe`] has no [`Observation`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ObserveError {
    /// The statement failed, or the connection did.
    #[error(transparent)]
    Query(#[from] tokio_postgres::Error),
    /// The statement answered without a row (something between the client
    /// and PostgreSQL that does not pass it through).
    #[error("the observation query returned no row")]
    NoRow,
}

impl Observation {
    /// The role, decided one way: in recovery or read-only is
    /// [`Role::Replica`]; only a node that accepts writes is
    /// [`Role::Primary`].
    pub fn role(&self) -> Role {
        if self.accepts_writes() {
            Role::Primary
        } else {
            Role::Replica
        }
    }

    /// Whether the node accepts writes: neither in recovery nor read-only.
    pub fn accepts_writes(&self) -> bool {
        !self.in_recovery && !self.read_only
    }

    /// The lag behind `primary` (the primary's current position): see
    /// [`replica_lag`]. Unknown for a node that is not in recovery, which
    /// replays nothing.
    pub fn lag(&self, primary: Option<WalPosition>) -> ReplicaLag {
        if self.in_recovery {
            replica_lag(primary, self.replay_position, self.replay_age)
        } else {
            ReplicaLag::default()
        }
    }

    /// Whether a node in recovery has not replayed up to `primary` yet.
    pub fn is_behind(&self, primary: Option<WalPosition>) -> bool {
        self.in_recovery && matches!((primary, self.replay_position), (Some(p), Some(r)) if r < p)
    }

    /// Reads the six columns of [`OBSERVE_QUERY`], as text.
    fn from_columns(columns: [Option<&str>; 6]) -> Observation {
        let [in_recovery, read_only, current, replay, age, identity] = columns;
        Observation {
            in_recovery: in_recovery == Some("t"),
            read_only: read_only == Some("on"),
            wal_position: current.and_then(|t| t.parse().ok()),
            replay_position: replay.and_then(|t| t.parse().ok()),
            replay_age: age.and_then(parse_age),
            identity: identity.map(fingerprint),
        }
    }
}

/// A stable 64-bit fingerprint of a text (FNV-1a), never 0.
fn fingerprint(text: &str) -> u64 {
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    hash.max(1)
}

/// Seconds as PostgreSQL prints a `float8`; a negative age (clocks of
/// primary and replica apart) is zero, anything not finite unknown.
fn parse_age(text: &str) -> Option<Duration> {
    let seconds: f64 = text.parse().ok()?;
    if !seconds.is_finite() {
        return None;
    }
    Duration::try_from_secs_f64(seconds.max(0.0)).ok()
}

/// A replica's lag: bytes between `primary` and `replay`, and time — zero
/// when the replica has replayed `primary`, else the age of the last
/// replayed transaction (`replay_age`), or, behind with none replayed yet,
/// as far behind as it gets. Unknown positions give an unknown lag.
pub fn replica_lag(
    primary: Option<WalPosition>,
    replay: Option<WalPosition>,
    replay_age: Option<Duration>,
) -> ReplicaLag {
    let bytes = match (primary, replay) {
        (Some(p), Some(r)) => Some(p.as_u64().saturating_sub(r.as_u64())),
        _ => None,
    };
    let time = match (bytes, replay_age) {
        (Some(0), _) => Some(Duration::ZERO),
        (Some(_), Some(age)) => Some(age),
        (Some(_), None) => Some(NOTHING_REPLAYED),
        (None, _) => None,
    };
    ReplicaLag { bytes, time }
}

/// Asks the server behind `conn` its role and WAL positions, in one round
/// trip ([`OBSERVE_QUERY`]). The caller bounds the time.
///
/// # Errors
/// [`ObserveError::Query`] when the statement or the connection fails,
/// [`ObserveError::NoRow`] when no row came back.
pub async fn observe(conn: &PooledConnection) -> Result<Observation, ObserveError> {
    let messages = conn.simple_query(OBSERVE_QUERY).await?;
    let row = messages
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        })
        .ok_or(ObserveError::NoRow)?;
    Ok(Observation::from_columns([
        row.get(0),
        row.get(1),
        row.get(2),
        row.get(3),
        row.get(4),
        row.try_get(5).ok().flatten(),
    ]))
}

/// [`observe`] for a replica's lag behind `primary` (the primary's current
/// position, measured just before): a replica seen behind is looked at again
/// after [`LOOK_AGAIN_AFTER`], and the second answer counts.
///
/// # Errors
/// As [`observe`].
pub async fn observe_replica(
    conn: &PooledConnection,
    primary: Option<WalPosition>,
) -> Result<Observation, ObserveError> {
    let seen = observe(conn).await?;
    if !seen.is_behind(primary) {
        return Ok(seen);
    }
    tokio::time::sleep(LOOK_AGAIN_AFTER).await;
    observe(conn).await
}

impl Node {
    /// Feeds an observation to routing: the observed role; for a node in
    /// recovery also its replay position and `lag` (from
    /// [`Observation::lag`]); for one that is not, no lag.
    /// A server of another identity than the one seen before (restarted,
    /// rebuilt, or another server behind the address) forgets the replay
    /// position recorded for the old one first.
    pub fn record_observation(&self, seen: &Observation, lag: ReplicaLag) {
        if let Some(identity) = seen.identity
            && self.replace_identity(identity)
        {
            tracing::info!(
                node = self.name(),
                "the server behind the node changed (restarted, rebuilt or replaced): its \
                 replay position starts over"
            );
            self.set_replay_position(None);
        }
        self.set_observed_role(Some(seen.role()));
        if seen.in_recovery {
            self.set_replay_position(seen.replay_position);
            self.set_replica_lag(lag.time);
            self.set_replica_lag_bytes(lag.bytes);
        } else {
            self.set_replica_lag(None);
            self.set_replica_lag_bytes(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(n: u64) -> Option<WalPosition> {
        Some(WalPosition::from_u64(n))
    }

    fn seen(in_recovery: &str, read_only: &str) -> Observation {
        Observation::from_columns([Some(in_recovery), Some(read_only), None, None, None, None])
    }

    #[test]
    fn in_recovery_or_read_only_is_a_replica() {
        assert_eq!(seen("f", "off").role(), Role::Primary);
        assert!(seen("f", "off").accepts_writes());
        assert_eq!(seen("t", "on").role(), Role::Replica);
        assert_eq!(seen("t", "off").role(), Role::Replica);
        // A primary made read-only: a replica, for everyone.
        assert_eq!(seen("f", "on").role(), Role::Replica);
        assert!(!seen("f", "on").accepts_writes());
    }

    #[test]
    fn the_columns_are_read_as_postgres_prints_them() {
        let primary = Observation::from_columns([
            Some("f"),
            Some("off"),
            Some("0/3000148"),
            None,
            None,
            None,
        ]);
        assert_eq!(
            primary.wal_position,
            Some(WalPosition::from_u64(0x300_0148))
        );
        assert_eq!(primary.replay_position, None);
        let replica = Observation::from_columns([
            Some("t"),
            Some("on"),
            None,
            Some("0/3000100"),
            Some("2.5"),
            Some("7301234567890123456@2026-12-07 10:00:00.1+00"),
        ]);
        assert_eq!(replica.wal_position, None);
        assert!(replica.identity.is_some());
        assert_eq!(primary.identity, None);
        assert_eq!(replica.replay_position, at(0x300_0100));
        assert_eq!(replica.replay_age, Some(Duration::from_millis(2500)));
        assert_eq!(parse_age("-0.25"), Some(Duration::ZERO));
        assert_eq!(parse_age("NaN"), None);
        assert_eq!(parse_age("Infinity"), None);
        assert_eq!(parse_age("1e300"), None);
        assert_eq!(parse_age("soon"), None);
    }

    #[tokio::test]
    async fn another_server_behind_a_node_starts_its_replay_position_over() {
        let settings = pgstack_config::NodeSettings::from_url("postgres://app@127.0.0.1:1/app")
            .unwrap_or_else(|e| panic!("{e}"));
        let attributes = crate::telemetry::NodeAttributes::new(&settings);
        let pool = pgstack_pool::Pool::builder(settings)
            .build_lazy()
            .unwrap_or_else(|e| panic!("{e}"));
        let lanes = crate::lanes::Lanes::new(0, Duration::from_millis(5));
        let node = Node::new(
            1,
            "replica-1".into(),
            Role::Replica,
            pool,
            lanes,
            attributes,
        );
        let seen = |identity: &str, replayed: u64| {
            Observation::from_columns([
                Some("t"),
                Some("on"),
                None,
                Some(&format!("0/{replayed:X}")),
                Some("0"),
                Some(identity),
            ])
        };
        node.record_observation(&seen("1@a", 0x500), ReplicaLag::default());
        assert_eq!(node.replay_position(), at(0x500));
        // The same server: positions only move forward.
        node.record_observation(&seen("1@a", 0x400), ReplicaLag::default());
        assert_eq!(node.replay_position(), at(0x500));
        // Rebuilt (another start): its position is taken as it is.
        node.record_observation(&seen("1@b", 0x100), ReplicaLag::default());
        assert_eq!(node.replay_position(), at(0x100));
    }

    #[test]
    fn caught_up_means_no_lag() {
        let caught_up = ReplicaLag {
            bytes: Some(0),
            time: Some(Duration::ZERO),
        };
        let hour = Some(Duration::from_secs(3600));
        assert_eq!(replica_lag(at(100), at(100), hour), caught_up);
        assert_eq!(replica_lag(at(100), at(120), hour), caught_up);
    }

    #[test]
    fn behind_means_the_age_of_the_last_replayed_transaction() {
        assert_eq!(
            replica_lag(at(100), at(40), Some(Duration::from_millis(2500))),
            ReplicaLag {
                bytes: Some(60),
                time: Some(Duration::from_millis(2500)),
            }
        );
        let none_replayed = replica_lag(at(100), at(40), None);
        assert_eq!(none_replayed.bytes, Some(60));
        assert!(none_replayed.time > Some(Duration::from_secs(100 * 365 * 86_400)));
    }

    #[test]
    fn unknown_primary_position_means_unknown_lag() {
        assert_eq!(
            replica_lag(None, at(40), Some(Duration::from_secs(1))),
            ReplicaLag::default()
        );
        assert_eq!(replica_lag(at(40), None, None), ReplicaLag::default());
    }

    #[test]
    fn only_a_node_in_recovery_lags_or_is_behind() {
        let replica = Observation {
            in_recovery: true,
            read_only: true,
            wal_position: None,
            replay_position: at(40),
            replay_age: Some(Duration::from_secs(1)),
            identity: None,
        };
        assert!(replica.is_behind(at(100)));
        assert!(!replica.is_behind(at(40)));
        assert!(!replica.is_behind(None));
        assert_eq!(replica.lag(at(100)).bytes, Some(60));
        let read_only_primary = Observation {
            in_recovery: false,
            read_only: true,
            wal_position: at(500),
            replay_position: None,
            replay_age: None,
            identity: None,
        };
        assert!(!read_only_primary.is_behind(at(100)));
        assert_eq!(read_only_primary.lag(at(100)), ReplicaLag::default());
    }
}
