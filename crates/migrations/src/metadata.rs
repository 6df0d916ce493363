//! `pgstack_metadata`: a key/value table pgstack keeps next to the schema.
//! It records the environment a database was migrated for, so that
//! `db-reset` can refuse to wipe a production database.

use std::str::FromStr;

use pgstack_config::Environment;
use sqlx::PgConnection;

use crate::error::{Error, Result, db};

/// The key under which the environment is stored.
pub const ENVIRONMENT_KEY: &str = "environment";

/// The table's definition; the reference schema's `0005_pgstack_metadata`
/// migration creates the same table.
pub const METADATA_TABLE_SQL: &str = "CREATE TABLE IF NOT EXISTS pgstack_metadata (
    key        text        PRIMARY KEY CHECK (key <> ''),
    value      text        NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
)";

pub(crate) async fn write_environment(conn: &mut PgConnection, env: Environment) -> Result<()> {
    sqlx::raw_sql(METADATA_TABLE_SQL)
        .execute(&mut *conn)
        .await
        .map_err(db("creating pgstack_metadata"))?;
    sqlx::query(
        "INSERT INTO pgstack_metadata (key, value) VALUES ($1, $2) \
         ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = now()",
    )
    .bind(ENVIRONMENT_KEY)
    .bind(env.as_str())
    .execute(&mut *conn)
    .await
    .map_err(db("recording the environment in pgstack_metadata"))?;
    tracing::debug!(environment = %env, "recorded the environment in pgstack_metadata");
    Ok(())
}

pub(crate) async fn read_environment(conn: &mut PgConnection) -> Result<Option<Environment>> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('pgstack_metadata') IS NOT NULL")
        .fetch_one(&mut *conn)
        .await
        .map_err(db("looking for pgstack_metadata"))?;
    if !exists {
        return Ok(None);
    }
    let value: Option<String> =
        sqlx::query_scalar("SELECT value FROM pgstack_metadata WHERE key = $1")
            .bind(ENVIRONMENT_KEY)
            .fetch_optional(&mut *conn)
            .await
            .map_err(db("reading pgstack_metadata"))?;
    value
        .map(|v| {
            Environment::from_str(&v).map_err(|e| Error::Metadata {
                key: ENVIRONMENT_KEY.to_owned(),
                value: v.clone(),
                reason: e.to_string(),
            })
        })
        .transpose()
}
