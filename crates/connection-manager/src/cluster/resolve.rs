//! A `COMMIT` whose connection broke in flight: looked up on another
//! connection (`txid_status`) instead of reported as unknown.
//!
//! The transaction's id, and where the server was when the transaction
//! wrote (its start time, its timeline, the WAL insert position after the
//! write), were read in the round trip of the first write
//! ([`pgstack_pool::XACT_PROBE_SQL`]), or at the latest just before
//! `COMMIT`. The answer of `txid_status(id)` is trusted only from a server
//! whose history holds the transaction's writes: the same server, not
//! restarted since; or one whose recovery replayed past the write (a
//! restart after a crash, a promoted replica). A server whose log ends
//! before the write never saw the transaction, and may even have given its
//! id to another one since: the transaction did not commit there.

use pgstack_pool::XactProbe;

use super::*;
use crate::stats::Resolution;

/// What the server asked answered.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Answer {
    /// `pg_is_in_recovery()`: a replica (or a primary not yet promoted).
    pub(super) in_recovery: bool,
    /// `pg_postmaster_start_time()` as text.
    pub(super) started: Option<String>,
    /// The primary's timeline.
    pub(super) timeline: Option<u32>,
    /// `pg_last_wal_replay_lsn()`: where its last recovery ended (`None`:
    /// it started without recovery).
    pub(super) replayed: Option<u64>,
    /// `txid_status(id)`.
    pub(super) status: Status,
}

/// `txid_status(id)`'s answer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) enum Status {
    /// `committed`, `aborted` or `in progress`.
    Said(String),
    /// NULL: the id is too old for the server to remember.
    #[default]
    Forgotten,
    /// The server has not handed out this id yet (`22023`, "in the future").
    Future,
    /// Another error, in words.
    Failed(String),
}

/// What the answer means for the transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    Committed,
    /// Rolled back: nothing took effect, so the transaction may be retried.
    Aborted,
    /// The primary answering now never saw the transaction's writes, and it
    /// is another server than the one that ran it (a promotion).
    Lost(String),
    Unknown(String),
    /// The session that ran it still holds it open (it has not noticed the
    /// break, or the `COMMIT` has not arrived): ask again, or end it.
    InProgress,
    /// Not a primary (yet): ask again.
    NotPrimary,
}

/// Decides what `answer`, from the server behind `same_node` (the node the
/// transaction ran on, or another), means for the transaction `probe`
/// describes.
pub(super) fn judge(probe: &XactProbe, same_node: bool, answer: &Answer) -> Verdict {
    if answer.in_recovery {
        return Verdict::NotPrimary;
    }
    let same_timeline = probe.timeline.is_some() && probe.timeline == answer.timeline;
    // The very server that ran it, not restarted since.
    let same_server = same_node
        && same_timeline
        && probe.server_started.is_some()
        && probe.server_started == answer.started;
    // Whether the answering server's history holds the transaction's writes.
    let holds = if same_server {
        Some(true)
    } else {
        match (answer.replayed, probe.insert_lsn) {
            (Some(replayed), Some(written)) => Some(replayed >= written),
            // Restarted without recovery: it had shut down cleanly, with
            // everything written out and nothing lost.
            (None, _) if same_node && same_timeline => Some(true),
            _ => None,
        }
    };
    let not_there = |why: &str| {
        if same_node && same_timeline {
            // Its own log lost the writes (a crash): it never committed.
            Verdict::Aborted
        } else {
            Verdict::Lost(why.to_owned())
        }
    };
    let never_saw = "the primary answering now (another server, or a new timeline after a \
                     promotion) never received the transaction's writes";
    match &answer.status {
        Status::Future => not_there(never_saw),
        Status::Forgotten => Verdict::Unknown(
            "the server no longer remembers the transaction's id (older than its commit-log \
             horizon)"
                .to_owned(),
        ),
        Status::Failed(why) => Verdict::Unknown(format!("txid_status failed: {why}")),
        Status::Said(said) => match (said.as_str(), holds) {
            (_, Some(false)) => not_there(never_saw),
            ("in progress", _) if same_server => Verdict::InProgress,
            // An id a restarted server says is running is not this
            // transaction's (its session died with the old server).
            ("in progress", _) => Verdict::Unknown(
                "the server restarted and reports the transaction's id as running".to_owned(),
            ),
            ("committed", Some(true)) => Verdict::Committed,
            ("aborted", Some(true)) => Verdict::Aborted,
            (_, None) => Verdict::Unknown(
                "the primary that answers is not the server that ran the transaction, and it \
                 cannot tell whether its history holds the transaction's writes"
                    .to_owned(),
            ),
            (other, _) => Verdict::Unknown(format!("txid_status said {other:?}")),
        },
    }
}

/// The identity half of the question (pipelined with `txid_status`).
const WHERE_SQL: &str = "SELECT pg_is_in_recovery()::text, pg_postmaster_start_time()::text, \
     CASE WHEN pg_is_in_recovery() THEN NULL \
          ELSE substr(pg_walfile_name(pg_current_wal_insert_lsn()), 1, 8) END, \
     pg_last_wal_replay_lsn()::text";

/// How long a transaction may stay "in progress" on the server that ran it
/// before the session holding it is ended (it has not noticed the broken
/// connection: a partition, not a reset).
const IN_PROGRESS_PATIENCE: Duration = Duration::from_millis(300);

/// How often the question is asked again.
const ASK_AGAIN: Duration = Duration::from_millis(25);

/// Asks `node` about transaction `xid`; `Err` when it could not be asked.
async fn ask(node: &Node, xid: i64) -> Result<Answer, String> {
    let conn = node
        .pool()
        .get("pgstack-commit-status")
        .await
        .map_err(|e| e.to_string())?;
    let status_sql = format!("SELECT txid_status({xid})");
    let (place, status) =
        tokio::join!(conn.simple_query(WHERE_SQL), conn.simple_query(&status_sql));
    let place = place.map_err(|e| e.to_string())?;
    let row = place
        .iter()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        })
        .ok_or("no answer to the identity check")?;
    let text = |i: usize| row.try_get(i).ok().flatten();
    let status = match status {
        Ok(messages) => match first_text(&messages) {
            Some(said) => Status::Said(said.to_owned()),
            None => Status::Forgotten,
        },
        Err(e) => match e.as_db_error() {
            Some(db) if db.code().code() == "22023" => Status::Future,
            Some(db) => Status::Failed(format!("{}: {}", db.code().code(), db.message())),
            // The connection broke: ask again.
            None => return Err(e.to_string()),
        },
    };
    Ok(Answer {
        in_recovery: text(0) == Some("true"),
        started: text(1).map(str::to_owned),
        timeline: text(2).and_then(|t| u32::from_str_radix(t, 16).ok()),
        replayed: text(3).and_then(pgstack_pool::parse_lsn),
        status,
    })
}

/// Ends the session still holding transaction `xid` open on `node`, so that
/// it commits (its `COMMIT` had arrived) or rolls back (it had not).
async fn end_session_holding(node: &Node, xid: i64) {
    let Ok(conn) = node.pool().get("pgstack-commit-status").await else {
        return;
    };
    let xid32 = xid & 0xFFFF_FFFF;
    let sql = format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE backend_xid::text = '{xid32}' AND pid <> pg_backend_pid()"
    );
    match conn.simple_query(&sql).await {
        Ok(_) => tracing::info!(
            node = node.name(),
            xid,
            "ended the session still holding a transaction whose connection broke"
        ),
        Err(error) => tracing::debug!(node = node.name(), xid, %error, "could not end the session"),
    }
}

impl Cluster {
    /// A `COMMIT` was in flight when its connection broke or its round trip
    /// ran out: asks the primary, on another connection and until `until`
    /// (the call's deadline), whether the transaction committed. `Ok` when
    /// it did; a retryable error when it was rolled back (nothing took
    /// effect); [`Error::CommitLost`] when the primary now answering never
    /// saw it; [`Error::CommitOutcomeUnknown`], saying why, when nobody can
    /// tell.
    pub(super) async fn resolve_commit(
        &self,
        node: &Node,
        op: &Op,
        probe: &XactProbe,
        source: Option<tokio_postgres::Error>,
        until: Instant,
    ) -> Result<(), Error> {
        let xid = match probe.xid {
            TransactionId::Assigned(xid) => xid,
            // It wrote nothing: there was nothing to commit, and what it
            // read stands.
            TransactionId::Unassigned => return Ok(()),
            _ => {
                self.inner
                    .counters
                    .resolved(node.name_arc(), Resolution::Unknown);
                tracing::info!(
                    op = op.name(),
                    node = node.name(),
                    outcome = Resolution::Unknown.as_str(),
                    why = "its transaction id was not learned",
                    "a COMMIT whose connection broke was looked up"
                );
                return Err(Error::CommitOutcomeUnknown {
                    node: Arc::clone(node.name_arc()),
                    operation: op.name().to_owned(),
                    reason: "the connection broke before the transaction's id was learned \
                             (it wrote only through statements that look like reads)"
                        .to_owned(),
                    xid: None,
                    source,
                });
            }
        };
        let verdict = self.look_up(node, xid, probe, until).await;
        let resolution = match &verdict {
            Verdict::Committed => Resolution::Committed,
            Verdict::Aborted => Resolution::Aborted,
            Verdict::Lost(_) => Resolution::Lost,
            _ => Resolution::Unknown,
        };
        self.inner.counters.resolved(node.name_arc(), resolution);
        tracing::info!(
            op = op.name(),
            node = node.name(),
            xid,
            outcome = resolution.as_str(),
            "a COMMIT whose connection broke was looked up"
        );
        match verdict {
            Verdict::Committed => Ok(()),
            // Rolled back: nothing took effect, so repeating it is safe.
            Verdict::Aborted => match source {
                Some(source) => Err(Error::Connection {
                    node: Arc::clone(node.name_arc()),
                    operation: op.name().to_owned(),
                    sent: true,
                    source,
                }),
                None => Err(Error::Timeout {
                    node: Arc::clone(node.name_arc()),
                    operation: op.name().to_owned(),
                    after: self
                        .inner
                        .settings
                        .round_trip
                        .unwrap_or(self.inner.settings.check_timeout),
                }),
            },
            Verdict::Lost(reason) => Err(Error::CommitLost {
                node: Arc::clone(node.name_arc()),
                operation: op.name().to_owned(),
                xid,
                reason,
            }),
            Verdict::Unknown(reason) => Err(Error::CommitOutcomeUnknown {
                node: Arc::clone(node.name_arc()),
                operation: op.name().to_owned(),
                reason,
                xid: Some(xid),
                source,
            }),
            Verdict::InProgress | Verdict::NotPrimary => Err(Error::CommitOutcomeUnknown {
                node: Arc::clone(node.name_arc()),
                operation: op.name().to_owned(),
                reason: "no primary could say before the call's deadline".to_owned(),
                xid: Some(xid),
                source,
            }),
        }
    }

    /// Asks until a verdict other than "ask again" comes, or `until`.
    async fn look_up(&self, node: &Node, xid: i64, probe: &XactProbe, until: Instant) -> Verdict {
        let mut problem = String::from("nobody was asked");
        let mut in_progress_since: Option<Instant> = None;
        let mut failures = 0_u32;
        loop {
            if Instant::now() >= until {
                return Verdict::Unknown(format!(
                    "no primary could say before the call's deadline (last: {problem})"
                ));
            }
            // The node that ran it while it is the primary; else whichever
            // node is the primary now.
            let primary = self.primary().clone();
            let target = if primary.inner.index == node.inner.index || failures < 3 {
                node
            } else {
                &primary
            };
            let same_node = target.inner.index == node.inner.index;
            match tokio::time::timeout_at(until, ask(target, xid)).await {
                Err(_) => problem = format!("{} did not answer in time", target.name()),
                Ok(Err(why)) => {
                    problem = format!("{}: {why}", target.name());
                    failures += 1;
                    // The primary may be gone for good: look for the new one
                    // now and then.
                    if failures % 8 == 4 {
                        let _ = self.rediscover().await;
                    }
                }
                Ok(Ok(answer)) => match judge(probe, same_node, &answer) {
                    Verdict::NotPrimary => {
                        problem = format!("{} is in recovery", target.name());
                        failures += 1;
                        if failures % 8 == 4 {
                            let _ = self.rediscover().await;
                        }
                    }
                    Verdict::InProgress => {
                        problem = format!("{} reports the transaction in progress", target.name());
                        let since = *in_progress_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= IN_PROGRESS_PATIENCE {
                            end_session_holding(target, xid).await;
                        }
                    }
                    verdict => return verdict,
                },
            }
            tokio::time::sleep(ASK_AGAIN).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pgstack_pool::TransactionId;

    fn probe() -> XactProbe {
        let mut p = XactProbe::UNKNOWN;
        p.xid = TransactionId::Assigned(1000);
        p.server_started = Some("2026-12-07 10:00:00+00".into());
        p.insert_lsn = Some(0x500);
        p.timeline = Some(1);
        p
    }

    fn answer(status: &str) -> Answer {
        Answer {
            in_recovery: false,
            started: Some("2026-12-07 10:00:00+00".into()),
            timeline: Some(1),
            replayed: None,
            status: Status::Said(status.into()),
        }
    }

    #[test]
    fn the_same_server_is_believed() {
        assert_eq!(
            judge(&probe(), true, &answer("committed")),
            Verdict::Committed
        );
        assert_eq!(judge(&probe(), true, &answer("aborted")), Verdict::Aborted);
        assert_eq!(
            judge(&probe(), true, &answer("in progress")),
            Verdict::InProgress
        );
        let mut replica = answer("committed");
        replica.in_recovery = true;
        assert_eq!(judge(&probe(), true, &replica), Verdict::NotPrimary);
    }

    #[test]
    fn after_a_crash_only_a_log_that_holds_the_write_is_believed() {
        let mut restarted = answer("committed");
        restarted.started = Some("2026-12-07 10:05:00+00".into());
        // Recovery replayed past the write: the id is the transaction's.
        restarted.replayed = Some(0x600);
        assert_eq!(judge(&probe(), true, &restarted), Verdict::Committed);
        // Its log ended before the write: the id may belong to another
        // transaction now; this one never committed.
        restarted.replayed = Some(0x400);
        assert_eq!(judge(&probe(), true, &restarted), Verdict::Aborted);
        restarted.status = Status::Future;
        assert_eq!(judge(&probe(), true, &restarted), Verdict::Aborted);
        // A clean restart loses nothing.
        restarted.replayed = None;
        restarted.status = Status::Said("committed".into());
        assert_eq!(judge(&probe(), true, &restarted), Verdict::Committed);
        // Running, on a server started since: not this transaction.
        restarted.status = Status::Said("in progress".into());
        assert!(matches!(
            judge(&probe(), true, &restarted),
            Verdict::Unknown(_)
        ));
    }

    #[test]
    fn after_a_promotion_a_write_the_new_primary_never_saw_is_lost() {
        let mut promoted = answer("committed");
        promoted.started = Some("2026-12-07 09:00:00+00".into());
        promoted.timeline = Some(2);
        promoted.replayed = Some(0x400);
        assert!(matches!(
            judge(&probe(), false, &promoted),
            Verdict::Lost(_)
        ));
        promoted.status = Status::Future;
        assert!(matches!(
            judge(&probe(), false, &promoted),
            Verdict::Lost(_)
        ));
        // It had replayed the commit before it was promoted.
        promoted.replayed = Some(0x900);
        promoted.status = Status::Said("committed".into());
        assert_eq!(judge(&probe(), false, &promoted), Verdict::Committed);
        promoted.status = Status::Said("aborted".into());
        assert_eq!(judge(&probe(), false, &promoted), Verdict::Aborted);
    }

    #[test]
    fn what_cannot_be_told_is_unknown() {
        // No position was learned (the id came from the check before
        // COMMIT on a server that restarted since).
        let mut p = probe();
        p.insert_lsn = None;
        let mut other = answer("committed");
        other.started = Some("later".into());
        other.replayed = Some(0x900);
        other.timeline = Some(2);
        assert!(matches!(judge(&p, false, &other), Verdict::Unknown(_)));
        let mut forgotten = answer("committed");
        forgotten.status = Status::Forgotten;
        assert!(matches!(
            judge(&probe(), true, &forgotten),
            Verdict::Unknown(_)
        ));
    }
}
