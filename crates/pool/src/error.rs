//! The pool's errors.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pgstack_config::{ConnectExplanation, ConnectFailure, NodeSettings, explain_connect_failure};

use crate::status::PoolStatus;

/// What a checkout was doing when its acquire timeout ran out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum AcquirePhase {
    /// Queued behind other callers: every connection was checked out.
    WaitingForConnection,
    /// Waiting for a new connection to be opened (TCP, TLS, login).
    Connecting,
    /// Checking a connection before handing it out (ping or session reset).
    Validating,
}

impl AcquirePhase {
    /// A short description for messages.
    pub fn as_str(self) -> &'static str {
        match self {
            AcquirePhase::WaitingForConnection => "waiting for a free connection",
            AcquirePhase::Connecting => "connecting",
            AcquirePhase::Validating => "validating a connection",
        }
    }
}

impl fmt::Display for AcquirePhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why opening one connection failed. Its text is the cause first, then the
/// fix ([`pgstack_config::explain_connect_failure`]): "database \"bills\"
/// does not exist on db:5432; create it …".
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The server or the network refused, or login failed.
    #[error("{explanation}")]
    Postgres {
        /// The node (URL without password).
        node: Arc<str>,
        /// The cause and the fix, in words.
        explanation: ConnectExplanation,
        /// What tokio-postgres reported.
        #[source]
        source: tokio_postgres::Error,
    },
    /// TCP, TLS and login together took longer than `pool.connect_timeout`.
    #[error("{explanation}")]
    Timeout {
        /// The node (URL without password).
        node: Arc<str>,
        /// The connect timeout.
        after: Duration,
        /// The cause and the fix, in words.
        explanation: ConnectExplanation,
    },
    /// The pool was closed: no attempt was made.
    #[error("not connecting to {node}: the pool is closed")]
    PoolClosed {
        /// The node (URL without password).
        node: Arc<str>,
    },
    /// The node's circuit breaker is open: no attempt was made.
    #[error("not connecting to {node}: {source}")]
    CircuitOpen {
        /// The node (URL without password).
        node: Arc<str>,
        /// The breaker's rejection, with the time of the next probe.
        #[source]
        source: pgstack_resilience::Rejected,
    },
}

/// Explains a failed connect of tokio-postgres to `node`: the server's
/// SQLSTATE and message, or the innermost text of the transport's error.
pub(crate) fn explain(node: &NodeSettings, error: &tokio_postgres::Error) -> ConnectExplanation {
    if let Some(db) = error.as_db_error() {
        return explain_connect_failure(
            node,
            ConnectFailure::Server {
                code: db.code().code(),
                message: db.message(),
            },
        );
    }
    // The whole chain is searched for the cause's words; the innermost
    // text is what is quoted.
    let chain = Chain(error).to_string();
    let innermost = std::iter::successors(
        std::error::Error::source(error),
        |e: &&(dyn std::error::Error + 'static)| e.source(),
    )
    .last()
    .map(ToString::to_string);
    let text = match innermost {
        Some(inner) if !inner.is_empty() => {
            // Keep words only the outer layers say ("TLS handshake").
            if chain.to_ascii_lowercase().contains("tls")
                && !inner.to_ascii_lowercase().contains("tls")
            {
                chain
            } else {
                inner
            }
        }
        _ => chain,
    };
    explain_connect_failure(node, ConnectFailure::Transport { message: &text })
}

impl ConnectError {
    /// The cause and the fix, for a failed attempt (not for one that was
    /// not made).
    pub fn explanation(&self) -> Option<&ConnectExplanation> {
        match self {
            ConnectError::Postgres { explanation, .. }
            | ConnectError::Timeout { explanation, .. } => Some(explanation),
            _ => None,
        }
    }
}

/// A tokio-postgres error with its causes ("db error" alone says nothing).
pub(crate) struct Chain<'a>(pub(crate) &'a tokio_postgres::Error);

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(db) = self.0.as_db_error() {
            return write!(
                f,
                "{} {}: {}",
                db.severity(),
                db.code().code(),
                db.message()
            );
        }
        write!(f, "{}", self.0)?;
        let mut source = std::error::Error::source(self.0);
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

impl ConnectError {
    /// The SQLSTATE code when the server answered with an error (e.g.
    /// `28P01` for a wrong password, `53300` for too many connections).
    pub fn code(&self) -> Option<&str> {
        match self {
            ConnectError::Postgres { source, .. } => source.code().map(|c| c.code()),
            _ => None,
        }
    }

    /// Whether the error is the circuit breaker refusing the attempt.
    pub fn is_circuit_open(&self) -> bool {
        matches!(self, ConnectError::CircuitOpen { .. })
    }
}

/// A checkout that ran out of time, with what it was doing and why.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct AcquireTimeout {
    /// The node (URL without password).
    pub node: Arc<str>,
    /// The operation that asked for the connection.
    pub operation: String,
    /// The acquire timeout that ran out.
    pub waited: Duration,
    /// What the checkout was doing when the time ran out.
    pub phase: AcquirePhase,
    /// The last error seen while opening a connection, if any, with its age.
    pub last_connect_error: Option<LastConnectError>,
    /// The pool at the moment of the timeout.
    pub status: PoolStatus,
}

/// The most recent failure to open a connection.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct LastConnectError {
    /// The error.
    pub error: Arc<ConnectError>,
    /// How long ago it happened, at the time it was read.
    pub age: Duration,
}

impl fmt::Display for AcquireTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The last failed connect is the cause when it cannot pass by
        // waiting (a missing database, a refused password, an unknown host,
        // no TLS), or when the pool had no connection at all and was
        // connecting: said first.
        let connecting = self.phase == AcquirePhase::Connecting && self.status.size == 0;
        let permanent = self.last_connect_error.as_ref().and_then(|last| {
            last.error
                .explanation()
                .filter(|e| connecting || !e.problem.may_pass())
        });
        if let Some(explanation) = permanent {
            write!(f, "{explanation} (")?;
        }
        let s = &self.status;
        write!(
            f,
            "timed out after {:?} getting a connection to {} for `{}` while {}; \
             pool: {} open ({} idle, {} in use, max {}), {} being opened, {} waiting",
            self.waited,
            self.node,
            self.operation,
            self.phase,
            s.size,
            s.idle,
            s.in_use,
            s.max_size,
            s.connecting,
            s.waiters,
        )?;
        match (&self.last_connect_error, permanent) {
            (Some(_), Some(_)) => f.write_str(")"),
            (Some(last), None) => write!(
                f,
                "; last connect error ({:?} ago): {}",
                last.age, last.error
            ),
            (None, _) => Ok(()),
        }
    }
}

/// Invalid pool settings, each problem with the key, the value and a fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A setting is out of range.
    #[error("{key} = {value}: {problem}")]
    Invalid {
        /// The settings key, e.g. `pool.max_size`.
        key: &'static str,
        /// The value given.
        value: String,
        /// What is wrong and how to fix it.
        problem: &'static str,
    },
    /// The root certificate file could not be used.
    #[error("tls.root_cert = {path:?}: {problem}")]
    RootCert {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// TLS could not be set up.
    #[error("TLS set-up failed: {0}")]
    Tls(String),
    /// The circuit breaker settings were rejected.
    #[error("circuit_breaker: {0}")]
    CircuitBreaker(#[from] pgstack_resilience::InvalidSettings),
}

/// Everything [`crate::Pool`] can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// No connection within `pool.acquire_timeout`; says which phase ran out
    /// of time, the last connect error and the pool's state.
    #[error("{0}")]
    Timeout(Box<AcquireTimeout>),
    /// The node's circuit breaker is open: the call failed at once.
    #[error(
        "no connection to {node} for `{operation}`: {source}{}",
        last_error_suffix(last_connect_error.as_deref())
    )]
    CircuitOpen {
        /// The node (URL without password).
        node: Arc<str>,
        /// The operation that asked for the connection.
        operation: String,
        /// The breaker's rejection, with the time of the next probe.
        #[source]
        source: pgstack_resilience::Rejected,
        /// The last connect error, if any.
        last_connect_error: Option<Arc<ConnectError>>,
    },
    /// Opening a connection failed (at start, when warming `min_idle`).
    #[error(transparent)]
    Connect(#[from] Arc<ConnectError>),
    /// The settings are invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The pool was closed.
    #[error("the pool for {node} is closed")]
    Closed {
        /// The node (URL without password).
        node: Arc<str>,
    },
}

fn last_error_suffix(error: Option<&ConnectError>) -> String {
    match error {
        Some(error) => format!("; last connect error: {error}"),
        None => String::new(),
    }
}

impl PoolError {
    /// Whether the error is a timeout (of any phase).
    pub fn is_timeout(&self) -> bool {
        matches!(self, PoolError::Timeout(_))
    }

    /// Whether the circuit breaker refused the call.
    pub fn is_circuit_open(&self) -> bool {
        matches!(self, PoolError::CircuitOpen { .. })
    }

    /// The phase that timed out, for a timeout.
    pub fn timeout_phase(&self) -> Option<AcquirePhase> {
        match self {
            PoolError::Timeout(t) => Some(t.phase),
            _ => None,
        }
    }
}
