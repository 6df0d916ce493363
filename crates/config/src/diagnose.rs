//! Why connecting to a node failed, said the way a person can act on it:
//! the cause first, then the fix, in one sentence.
//!
//! Drivers report a failed connection as a chain ("error communicating with
//! database: … : Connection refused (os error 111)") whose useful part comes
//! last, sometimes twice. The crates that connect (the pool, the migrator,
//! the orchestrator's start, the command line) hand the parts they have —
//! the server's SQLSTATE and message, or the transport's innermost text, or
//! a time-out — to [`explain_connect_failure`], so a missing database, a
//! wrong password, an unknown host, a closed port, a server without TLS and
//! a port that does not speak PostgreSQL each read the same everywhere.

use std::fmt;
use std::time::Duration;

use crate::NodeSettings;

/// What a connection attempt ended with, as a driver reported it.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub enum ConnectFailure<'a> {
    /// The server answered with an error: its SQLSTATE and message.
    Server {
        /// The SQLSTATE, e.g. `3D000`.
        code: &'a str,
        /// The server's message, e.g. `database "x" does not exist`.
        message: &'a str,
    },
    /// The transport or the protocol failed: the innermost text of the
    /// driver's error (`Connection refused (os error 111)`, `failed to
    /// lookup address information: …`, `server does not support TLS`, …).
    Transport {
        /// The text.
        message: &'a str,
    },
    /// Nothing came back in time.
    TimedOut {
        /// The time allowed.
        after: Duration,
    },
}

/// What kind of problem [`explain_connect_failure`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ConnectProblem {
    /// The database does not exist (`3D000`).
    DatabaseMissing,
    /// The password or the role was refused (`28P01`, `28000`).
    LoginRefused,
    /// The host name does not resolve.
    UnknownHost,
    /// Nothing listens on the port.
    Refused,
    /// TLS was asked for and the server does not offer it, or its
    /// certificate was not trusted.
    Tls,
    /// Something answered that is not PostgreSQL.
    NotPostgres,
    /// No answer in time.
    TimedOut,
    /// The server is starting up, shutting down or out of connection slots:
    /// it may accept the connection later.
    NotNow,
    /// Anything else.
    Other,
}

impl ConnectProblem {
    /// Whether waiting may help: the server is down, starting, busy or not
    /// answering, as opposed to a setting that is wrong.
    pub fn may_pass(self) -> bool {
        matches!(
            self,
            ConnectProblem::Refused | ConnectProblem::TimedOut | ConnectProblem::NotNow
        )
    }
}

/// The explanation of a failed connection: one sentence, the cause first
/// (naming the host, port, database or user involved), then the fix.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectExplanation {
    /// What went wrong.
    pub problem: ConnectProblem,
    /// The cause, e.g. `database "bills" does not exist on db.internal:5432`.
    pub cause: String,
    /// What to do about it.
    pub fix: String,
}

impl fmt::Display for ConnectExplanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}; {}", self.cause, self.fix)
    }
}

/// Explains why connecting to `node` failed (see the [module docs](self)).
///
/// ```
/// use pgstack_config::{ConnectFailure, ConnectProblem, NodeSettings, explain_connect_failure};
/// let node = NodeSettings::from_url("postgres://app@db.internal:5432/bills")?;
/// let failure = ConnectFailure::Server { code: "3D000", message: "database \"bills\" does not exist" };
/// let explained = explain_connect_failure(&node, failure);
/// assert_eq!(explained.problem, ConnectProblem::DatabaseMissing);
/// assert!(explained.to_string().starts_with("database \"bills\" does not exist on db.internal:5432"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn explain_connect_failure(
    node: &NodeSettings,
    failure: ConnectFailure<'_>,
) -> ConnectExplanation {
    let at = place(node);
    let (problem, cause, fix) = match failure {
        ConnectFailure::Server { code, message } => server(node, &at, code, message),
        ConnectFailure::Transport { message } => transport(node, &at, message),
        ConnectFailure::TimedOut { after } => (
            ConnectProblem::TimedOut,
            format!("{at} did not answer within {after:?}"),
            "the host is unreachable (a firewall dropping packets, a wrong address) or what \
             listens there is not PostgreSQL; check the host and port, or raise \
             pool.connect_timeout if the server is only slow"
                .to_owned(),
        ),
    };
    ConnectExplanation {
        problem,
        cause,
        fix,
    }
}

/// `host:port` (or the socket folder).
fn place(node: &NodeSettings) -> String {
    if node.host.starts_with('/') {
        format!("the socket in {} (port {})", node.host, node.port)
    } else {
        format!("{}:{}", node.host, node.port)
    }
}

fn server(
    node: &NodeSettings,
    at: &str,
    code: &str,
    message: &str,
) -> (ConnectProblem, String, String) {
    let message = message.trim();
    match code {
        "3D000" => (
            ConnectProblem::DatabaseMissing,
            format!("database \"{}\" does not exist on {at}", node.database),
            format!(
                "create it (`createdb -h {} -p {} {}`; `pgstack db-reset` for a development \
                 database) or fix the database name (DATABASE_URL, DB_NAME or primary.database)",
                node.host, node.port, node.database
            ),
        ),
        "28P01" => (
            ConnectProblem::LoginRefused,
            format!("{at} refused the password of user \"{}\"", node.user),
            "fix the password (DATABASE_URL, DB_PASSWORD or primary.password)".to_owned(),
        ),
        "28000" if message.contains("does not exist") => (
            ConnectProblem::LoginRefused,
            format!("role \"{}\" does not exist on {at}", node.user),
            format!(
                "create it (`CREATE ROLE \"{}\" LOGIN PASSWORD …`) or fix the user name \
                 (DATABASE_URL, DB_USER or primary.user)",
                node.user
            ),
        ),
        "28000" => (
            ConnectProblem::LoginRefused,
            format!("{at} refuses user \"{}\": {message}", node.user),
            "add a pg_hba.conf entry for this user, database and address, or connect as \
             another user"
                .to_owned(),
        ),
        "53300" => (
            ConnectProblem::NotNow,
            format!("{at} has no connection slot left: {message}"),
            "lower pool.max_size across the service's instances, or raise the server's \
             max_connections"
                .to_owned(),
        ),
        "57P03" => (
            ConnectProblem::NotNow,
            format!("{at} is starting up or shutting down: {message}"),
            "wait for it (startup.wait_for_database waits at start)".to_owned(),
        ),
        code => (
            ConnectProblem::Other,
            format!("{at} refused the connection: {message} (SQLSTATE {code})"),
            "see the server's log for the details".to_owned(),
        ),
    }
}

fn transport(node: &NodeSettings, at: &str, message: &str) -> (ConnectProblem, String, String) {
    let lower = message.to_ascii_lowercase();
    let has = |needle: &str| lower.contains(needle);
    if has("failed to lookup address")
        || has("name or service not known")
        || has("nodename nor servname")
        || has("no such host")
        || has("temporary failure in name resolution")
    {
        (
            ConnectProblem::UnknownHost,
            format!("the host name \"{}\" does not resolve", node.host),
            "fix the host (DATABASE_URL, DB_HOST or primary.host)".to_owned(),
        )
    } else if has("connection refused") {
        (
            ConnectProblem::Refused,
            format!("nothing listens on {at} (connection refused)"),
            "start PostgreSQL there (`pgstack db-up` for a development server) or fix the port \
             (DATABASE_URL, DB_PORT or primary.port)"
                .to_owned(),
        )
    } else if has("does not support tls") || has("does not support ssl") {
        (
            ConnectProblem::Tls,
            format!("{at} does not offer TLS, and tls.mode asks for it"),
            "turn ssl on in the server's configuration, or set tls.mode = prefer or disable \
             (DB_SSLMODE) where the network is trusted"
                .to_owned(),
        )
    } else if has("certificate") || has("tls") || has("ssl") || has("handshake") {
        (
            ConnectProblem::Tls,
            format!("the TLS handshake with {at} failed: {message}"),
            "check tls.root_cert (the CA that signed the server's certificate) and that the \
             certificate names the host you connect to (tls.mode = verify-full)"
                .to_owned(),
        )
    } else if has("unexpected message")
        || has("invalid message")
        || has("protocol")
        || has("unexpected eof")
        || has("unexpected or invalid data")
        || has("invalid response")
        || has("expected to read")
        || has("at eof")
        || has("bytes remaining on stream")
    {
        (
            ConnectProblem::NotPostgres,
            format!("what listens on {at} does not speak the PostgreSQL protocol ({message})"),
            "check the port (DATABASE_URL, DB_PORT or primary.port): another service answered"
                .to_owned(),
        )
    } else if has("timed out") {
        (
            ConnectProblem::TimedOut,
            format!("{at} did not answer in time ({message})"),
            "check the host and port, or raise pool.connect_timeout if the server is only slow"
                .to_owned(),
        )
    } else if has("connection reset") || has("broken pipe") || has("closed") {
        (
            ConnectProblem::NotPostgres,
            format!("{at} closed the connection before the login finished ({message})"),
            "check the port (another service may listen there) and the server's log".to_owned(),
        )
    } else {
        (
            ConnectProblem::Other,
            format!("connecting to {at} failed: {message}"),
            "check the host, port and TLS settings".to_owned(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> NodeSettings {
        NodeSettings {
            host: "db.internal".into(),
            port: 5433,
            database: "bills".into(),
            user: "app".into(),
            password: None,
        }
    }

    fn explain(failure: ConnectFailure<'_>) -> ConnectExplanation {
        explain_connect_failure(&node(), failure)
    }

    #[test]
    fn each_cause_comes_first_with_its_fix() {
        let cases: Vec<(ConnectFailure<'_>, ConnectProblem, &str, &str)> = vec![
            (
                ConnectFailure::Server {
                    code: "3D000",
                    message: "database \"bills\" does not exist",
                },
                ConnectProblem::DatabaseMissing,
                "database \"bills\" does not exist on db.internal:5433",
                "createdb",
            ),
            (
                ConnectFailure::Server {
                    code: "28P01",
                    message: "password authentication failed for user \"app\"",
                },
                ConnectProblem::LoginRefused,
                "db.internal:5433 refused the password of user \"app\"",
                "DB_PASSWORD",
            ),
            (
                ConnectFailure::Server {
                    code: "28000",
                    message: "role \"app\" does not exist",
                },
                ConnectProblem::LoginRefused,
                "role \"app\" does not exist on db.internal:5433",
                "CREATE ROLE",
            ),
            (
                ConnectFailure::Transport {
                    message: "failed to lookup address information: Name or service not known",
                },
                ConnectProblem::UnknownHost,
                "the host name \"db.internal\" does not resolve",
                "DB_HOST",
            ),
            (
                ConnectFailure::Transport {
                    message: "Connection refused (os error 111)",
                },
                ConnectProblem::Refused,
                "nothing listens on db.internal:5433 (connection refused)",
                "pgstack db-up",
            ),
            (
                ConnectFailure::Transport {
                    message: "server does not support TLS",
                },
                ConnectProblem::Tls,
                "db.internal:5433 does not offer TLS",
                "DB_SSLMODE",
            ),
            (
                ConnectFailure::Transport {
                    message: "unexpected message from server",
                },
                ConnectProblem::NotPostgres,
                "what listens on db.internal:5433 does not speak the PostgreSQL protocol",
                "another service",
            ),
            (
                ConnectFailure::TimedOut {
                    after: Duration::from_secs(5),
                },
                ConnectProblem::TimedOut,
                "db.internal:5433 did not answer within 5s",
                "pool.connect_timeout",
            ),
        ];
        for (failure, problem, cause, fix) in cases {
            let explained = explain(failure);
            let text = explained.to_string();
            assert_eq!(explained.problem, problem, "{text}");
            assert!(text.starts_with(cause), "{text}");
            assert!(explained.fix.contains(fix), "{text}");
            // One sentence: the cause is said once.
            assert_eq!(text.matches(cause).count(), 1, "{text}");
        }
    }

    #[test]
    fn only_a_server_that_is_down_busy_or_silent_may_pass() {
        assert!(
            explain(ConnectFailure::Transport {
                message: "Connection refused"
            })
            .problem
            .may_pass()
        );
        assert!(
            !explain(ConnectFailure::Server {
                code: "3D000",
                message: "x"
            })
            .problem
            .may_pass()
        );
    }
}
