//! The guard of the commands that destroy data (`db-reset`, `migrate down`,
//! `restore` over an existing database), and the small server helpers they
//! share.
//!
//! Guarded as mature tools guard it: a command refuses when the environment
//! is production, when the host is not local, or when the database records
//! (in `pgstack_metadata`) that it is a production database — unless
//! `--confirm-destroy DATABASE` names the database. Refusals change nothing.

use std::process::ExitCode;

use anyhow::Context as _;
use pgstack_config::{DatabaseConfig, Environment, NodeSettings, PoolSettings};
use pgstack_pool::{Pool, PoolError, PooledConnection};

use crate::context::{Context, Target};

/// Why a destructive command is refused, and how to get past it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal(pub(crate) String);

/// How the messages of one destructive command name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Action {
    /// The command, as in "db-reset refused".
    pub(crate) command: &'static str,
    /// What it does, as in "the database to reset is".
    pub(crate) verb: &'static str,
    /// What it did, as in "only local databases are reset without confirmation".
    pub(crate) done: &'static str,
}

/// `pgstack db-reset`.
pub(crate) const DB_RESET: Action = Action {
    command: "db-reset",
    verb: "reset",
    done: "reset",
};

/// The database a command works on: the configured one, or the development cluster's.
pub(crate) fn database_name(ctx: &Context) -> &str {
    match ctx.target {
        Target::Configured => ctx.config.primary.database.as_str(),
        Target::Dev { .. } => pgstack_localpg::DevCluster::DATABASE,
    }
}

/// The guards that need no server: a production environment and a non-local host.
pub(crate) fn static_refusals(ctx: &Context, action: Action) -> Vec<Refusal> {
    let mut refusals = Vec::new();
    if ctx.config.environment == Environment::Production {
        refusals.push(Refusal(
            "the environment is production (APP_ENV / PGSTACK_ENV / --env)".to_owned(),
        ));
    }
    if ctx.target == Target::Configured && !is_local(&ctx.config.primary.host) {
        refusals.push(Refusal(format!(
            "the host `{}` is not local (only localhost, 127.0.0.0/8, ::1 and Unix sockets are {} without confirmation)",
            ctx.config.primary.host, action.done
        )));
    }
    refusals
}

/// The guard that reads the database: it records that it is a production database.
pub(crate) fn marked_production(database: &str) -> Refusal {
    Refusal(format!(
        "the database `{database}` records that it is a production database (pgstack_metadata.environment = production)"
    ))
}

/// Whether `--confirm-destroy` was given; it must name `database` exactly,
/// otherwise the command stops with an error before changing anything.
pub(crate) fn confirmation(
    confirm: Option<&str>,
    database: &str,
    action: Action,
) -> anyhow::Result<bool> {
    match confirm {
        None => Ok(false),
        Some(name) if name == database => Ok(true),
        Some(name) => anyhow::bail!(
            "--confirm-destroy names `{name}`, but the database to {} is `{database}`; nothing was changed",
            action.verb
        ),
    }
}

/// Prints why the command refused (on stderr) and returns exit code 1.
pub(crate) fn refuse(
    action: Action,
    database: &str,
    refusals: &[Refusal],
) -> anyhow::Result<ExitCode> {
    let mut text = format!(
        "{} refused; nothing was changed. `{database}` is protected because:",
        action.command
    );
    for r in refusals {
        text.push_str(&format!("\n  - {}", r.0));
    }
    text.push_str(&format!(
        "\nIf you really mean to destroy it, run again with --confirm-destroy {database}"
    ));
    let mut err = std::io::stderr().lock();
    std::io::Write::write_all(&mut err, format!("{text}\n").as_bytes())?;
    Ok(ExitCode::FAILURE)
}

/// Whether `host` is this machine: a Unix socket folder, localhost, 127.0.0.0/8 or ::1.
pub(crate) fn is_local(host: &str) -> bool {
    if host.starts_with('/') || host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

/// A one-connection pool on the server's `postgres` database, for CREATE/DROP DATABASE.
pub(crate) fn admin_pool(config: &DatabaseConfig, name: &str) -> anyhow::Result<Pool> {
    let node = NodeSettings {
        database: "postgres".to_owned(),
        ..config.primary.clone()
    };
    pool_on(config, node, name)
        .context("setting up a connection to the server's `postgres` database")
}

/// A one-connection pool on `node`, with the configuration's TLS and keepalive settings.
pub(crate) fn pool_on(
    config: &DatabaseConfig,
    node: NodeSettings,
    name: &str,
) -> anyhow::Result<Pool> {
    let settings = PoolSettings {
        min_idle: 0,
        max_size: 1,
        ..config.pool.clone()
    };
    Ok(Pool::builder(node)
        .name(name)
        .pool_settings(settings)
        .tls(config.tls.clone())
        .keepalive(config.keepalive.clone())
        .without_circuit_breaker()
        .build_lazy()?)
}

/// A connection from one of the command's own pools ([`pool_on`],
/// [`admin_pool`]). While the pool has no connection open, the first login
/// is made with [`Pool::probe`], which fails at once with the cause and its
/// fix (nothing listens, wrong password, no such database). A plain checkout
/// would wait `pool.acquire_timeout` for a connection that never comes, and
/// a shorter `--timeout` would cut it off with "no answer" instead.
pub(crate) async fn checkout(pool: &Pool, what: &'static str) -> anyhow::Result<PooledConnection> {
    if pool.status().size == 0 {
        match pool.probe().await {
            Ok(()) => {}
            // The explanation says it all; the driver's chain would say it again.
            Err(PoolError::Connect(failed)) => match failed.explanation() {
                Some(explained) => anyhow::bail!("{explained}"),
                None => return Err(PoolError::Connect(failed).into()),
            },
            Err(other) => return Err(other.into()),
        }
    }
    Ok(pool.get(what).await?)
}

/// Whether the server has a database called `name`.
pub(crate) async fn database_exists(admin: &Pool, name: &str) -> anyhow::Result<bool> {
    let conn = checkout(admin, "look up database").await?;
    let row = conn
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await
        .context("looking up the database")?;
    Ok(row.is_some())
}

/// The environment the database records in `pgstack_metadata`, if any (read through `pool`).
pub(crate) async fn recorded_environment(pool: &Pool) -> anyhow::Result<Option<Environment>> {
    let conn = checkout(pool, "read pgstack_metadata").await?;
    let exists: bool = conn
        .query_one("SELECT to_regclass('pgstack_metadata') IS NOT NULL", &[])
        .await
        .context("looking for pgstack_metadata")?
        .get(0);
    if !exists {
        return Ok(None);
    }
    let value: Option<String> = conn
        .query_opt(
            "SELECT value FROM pgstack_metadata WHERE key = 'environment'",
            &[],
        )
        .await
        .context("reading the environment recorded in pgstack_metadata")?
        .map(|row| row.get(0));
    value
        .map(|v| {
            v.parse::<Environment>().with_context(|| {
                format!("pgstack_metadata records the environment {v:?}, which is not one")
            })
        })
        .transpose()
}

/// `name` as a quoted SQL identifier.
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_hosts() {
        for host in [
            "localhost",
            "LOCALHOST",
            "127.0.0.1",
            "127.1.2.3",
            "::1",
            "[::1]",
            "/var/run/postgresql",
        ] {
            assert!(is_local(host), "{host}");
        }
        for host in [
            "db.example.com",
            "10.0.0.5",
            "192.168.1.1",
            "::2",
            "localhost.example.com",
        ] {
            assert!(!is_local(host), "{host}");
        }
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("app"), "\"app\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }

    #[test]
    fn confirmation_must_name_the_database() {
        assert!(!confirmation(None, "app", DB_RESET).unwrap());
        assert!(confirmation(Some("app"), "app", DB_RESET).unwrap());
        let error = confirmation(Some("other"), "app", DB_RESET)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("--confirm-destroy names `other`, but the database to reset is `app`"),
            "{error}"
        );
    }
}
