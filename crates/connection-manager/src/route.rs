//! Where a call goes ([`Route`]), what it is called ([`Op`]) and WAL
//! positions for read-your-writes ([`WalPosition`]).

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

/// A position in the write-ahead log (PostgreSQL's `pg_lsn`).
///
/// A write hands one back ([`crate::Cluster::execute_tracked`],
/// [`crate::Cluster::wal_position`]); a read given it with
/// [`Route::ReadAfter`] goes only to replicas that have replayed past it.
///
/// ```
/// use pgstack_connection::WalPosition;
/// let lsn: WalPosition = "16/B374D848".parse()?;
/// assert_eq!(lsn.as_u64(), 0x16_B374_D848);
/// assert_eq!(lsn.to_string(), "16/B374D848");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WalPosition(u64);

impl WalPosition {
    /// The position from its 64-bit value.
    pub const fn from_u64(value: u64) -> Self {
        WalPosition(value)
    }

    /// The 64-bit value.
    pub const fn as_u64(self) -> u64 {
        self.0
    }
}

impl From<tokio_postgres::types::PgLsn> for WalPosition {
    fn from(lsn: tokio_postgres::types::PgLsn) -> Self {
        WalPosition(u64::from(lsn))
    }
}

impl fmt::Display for WalPosition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// A text that is not `XXXXXXXX/XXXXXXXX` (hexadecimal halves).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "not a WAL position: {0:?}; expected two hexadecimal halves such as 16/B374D848, or the \
     token form pgstack-lsn:16/B374D848"
)]
pub struct InvalidWalPosition(String);

impl WalPosition {
    /// The prefix of [`WalPosition::to_token`]'s text.
    pub const TOKEN_PREFIX: &'static str = "pgstack-lsn:";

    /// The position as a stable text meant to travel between services (an
    /// HTTP header, a message field): `pgstack-lsn:16/B374D848`. The service
    /// that receives it parses it back ([`WalPosition::from_token`], or
    /// `str::parse`, which takes both forms) and reads with
    /// [`Route::ReadAfter`], so a write made through one service is seen by
    /// a read through another.
    ///
    /// ```
    /// use pgstack_connection::WalPosition;
    /// let lsn = WalPosition::from_u64(0x16_B374_D848);
    /// assert_eq!(lsn.to_token(), "pgstack-lsn:16/B374D848");
    /// assert_eq!(WalPosition::from_token("pgstack-lsn:16/B374D848")?, lsn);
    /// # Ok::<(), pgstack_connection::InvalidWalPosition>(())
    /// ```
    pub fn to_token(&self) -> String {
        format!("{}{self}", Self::TOKEN_PREFIX)
    }

    /// Reads [`WalPosition::to_token`]'s text (the prefix is required).
    ///
    /// # Errors
    /// [`InvalidWalPosition`] for any other text.
    pub fn from_token(token: &str) -> Result<WalPosition, InvalidWalPosition> {
        let bad = || InvalidWalPosition(token.to_owned());
        let position = token
            .trim()
            .strip_prefix(Self::TOKEN_PREFIX)
            .ok_or_else(bad)?;
        pgstack_pool::parse_lsn(position)
            .map(WalPosition)
            .ok_or_else(bad)
    }
}

/// Reads `16/B374D848`, or the token form `pgstack-lsn:16/B374D848`.
impl FromStr for WalPosition {
    type Err = InvalidWalPosition;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let text = s.trim();
        let text = text.strip_prefix(Self::TOKEN_PREFIX).unwrap_or(text);
        pgstack_pool::parse_lsn(text)
            .map(WalPosition)
            .ok_or_else(|| InvalidWalPosition(s.to_owned()))
    }
}

impl serde::Serialize for WalPosition {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// Where a call goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Route {
    /// A healthy replica within the lag limit (round-robin), else the primary.
    Read,
    /// The primary.
    Write,
    /// Read your writes: a replica that has replayed at least this position,
    /// else the primary.
    ReadAfter(WalPosition),
}

impl Route {
    /// The label used in metrics and logs: `read`, `write` or `read-after`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Route::Read => "read",
            Route::Write => "write",
            Route::ReadAfter(_) => "read-after",
        }
    }

    /// Whether the call only reads (and may be repeated freely).
    pub fn is_read(&self) -> bool {
        !matches!(self, Route::Write)
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Route::ReadAfter(lsn) => write!(f, "read-after {lsn}"),
            other => f.write_str(other.as_str()),
        }
    }
}

/// The name of an operation (`"fetch-bills"`), whether it is safe to
/// repeat, and the caller's deadline for its retries.
///
/// Every call takes one: it labels spans, metrics, slow-query logs and
/// errors. A `&'static str` converts without allocating.
///
/// ```
/// use std::time::Duration;
/// use pgstack_connection::Op;
/// let op = Op::from("upsert-user")
///     .idempotent()
///     .retry_deadline(Duration::from_secs(2));
/// assert_eq!(op.name(), "upsert-user");
/// assert!(op.is_idempotent());
/// assert_eq!(op.retry_deadline_override(), Some(Duration::from_secs(2)));
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Op {
    name: Name,
    idempotent: bool,
    resolvable: bool,
    retry_deadline: Option<Duration>,
}

/// An operation name: static text, or shared text (cloned per call without
/// allocating).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Name {
    Static(&'static str),
    Shared(Arc<str>),
}

impl Op {
    /// An operation named `name`, not idempotent.
    pub fn new(name: impl Into<Cow<'static, str>>) -> Self {
        let name = match name.into() {
            Cow::Borrowed(name) => Name::Static(name),
            Cow::Owned(name) => Name::Shared(name.into()),
        };
        Op {
            name,
            idempotent: false,
            resolvable: false,
            retry_deadline: None,
        }
    }

    /// Marks the work safe to repeat even if it may already have taken
    /// effect (an upsert, `INSERT ... ON CONFLICT DO NOTHING`, a `SET x = 5`).
    /// Writes marked so are retried after a connection loss.
    pub fn idempotent(mut self) -> Self {
        self.idempotent = true;
        self
    }

    /// Runs a single-statement write (`execute`, `query`, ... on
    /// [`Route::Write`], or any statement that is not a plain read) as a
    /// one-statement transaction, so that a connection lost while its commit
    /// was in flight is looked up (`txid_status`) like a transaction's:
    /// committed is success, rolled back is retried, and only an
    /// unanswerable one is [`crate::Error::CommitOutcomeUnknown`]. It costs
    /// a connection of its own and two more round trips (`BEGIN`, and
    /// `COMMIT` after the statement) instead of one on a shared connection.
    /// Reads are not affected.
    pub fn resolvable(mut self) -> Self {
        self.resolvable = true;
        self
    }

    /// Whether writes of this operation run as one-statement transactions
    /// ([`Op::resolvable`]).
    pub fn is_resolvable(&self) -> bool {
        self.resolvable
    }

    /// This call's retry deadline, in place of `retry.deadline`: no retry,
    /// and no wait for a node that is down, starts later than `within`
    /// after the call began, and an open breaker whose next probe comes
    /// after it fails the call at once. For a caller with a deadline of its
    /// own (an HTTP handler's 2 s): it fails fast instead of waiting for a
    /// recovery it cannot use. Each round trip of an attempt is still bounded by
    /// `statement_timeout` plus half the connect timeout, not by this.
    pub fn retry_deadline(mut self, within: Duration) -> Self {
        self.retry_deadline = Some(within);
        self
    }

    /// The deadline set with [`Op::retry_deadline`], if any.
    pub fn retry_deadline_override(&self) -> Option<Duration> {
        self.retry_deadline
    }

    /// The name.
    pub fn name(&self) -> &str {
        match &self.name {
            Name::Static(name) => name,
            Name::Shared(name) => name,
        }
    }

    /// The name for APIs that take a `Cow` (no allocation for static names).
    pub(crate) fn cow(&self) -> Cow<'static, str> {
        match &self.name {
            Name::Static(name) => Cow::Borrowed(name),
            Name::Shared(name) => Cow::Owned(name.to_string()),
        }
    }

    /// Whether the work is marked idempotent.
    pub fn is_idempotent(&self) -> bool {
        self.idempotent
    }

    /// The name when it is static text.
    pub(crate) fn static_name(&self) -> Option<&'static str> {
        match &self.name {
            Name::Static(name) => Some(name),
            Name::Shared(_) => None,
        }
    }

    /// The name as shared text (a clone of the `Arc`, or a new one for a
    /// static name).
    pub(crate) fn shared_name(&self) -> Arc<str> {
        match &self.name {
            Name::Static(name) => Arc::from(*name),
            Name::Shared(name) => Arc::clone(name),
        }
    }

    pub(crate) fn label(&self) -> metrics::SharedString {
        match &self.name {
            Name::Static(name) => metrics::SharedString::const_str(name),
            Name::Shared(name) => metrics::SharedString::from(Arc::clone(name)),
        }
    }
}

impl From<&'static str> for Op {
    fn from(name: &'static str) -> Self {
        Op::new(name)
    }
}

impl From<String> for Op {
    fn from(name: String) -> Self {
        Op::new(name)
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wal_positions_parse_print_and_order() {
        let a: WalPosition = "0/16B3740".parse().unwrap_or_default();
        let b: WalPosition = "1/0".parse().unwrap_or_default();
        assert_eq!(a.as_u64(), 0x16B_3740);
        assert!(a < b);
        assert_eq!(b.to_string(), "1/0");
        assert!("16B3740".parse::<WalPosition>().is_err());
        assert!("x/1".parse::<WalPosition>().is_err());
        assert!("1/2/3".parse::<WalPosition>().is_err());
        assert_eq!(b.to_token(), "pgstack-lsn:1/0");
        assert_eq!(" pgstack-lsn:1/0 ".parse::<WalPosition>().ok(), Some(b));
        assert_eq!(WalPosition::from_token(&a.to_token()).ok(), Some(a));
        assert!(WalPosition::from_token("1/0").is_err());
        assert!(WalPosition::from_token("pgstack-lsn:").is_err());
    }
}
