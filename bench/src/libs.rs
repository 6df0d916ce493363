//! The libraries under test, each set up the way its documentation shows,
//! with its defaults except the pool size a case asks for.

use std::time::Duration;

use anyhow::Context as _;
use pgstack::{Database, DatabaseConfig, Environment, Route};
use sqlx::Row as _;
use tokio_postgres::{Client, NoTls, Statement};

use crate::load::Worker;

/// Library names, as they appear in the tables and the JSON.
pub(crate) const PGSTACK: &str = "pgstack";
pub(crate) const PGSTACK_POOL: &str = "pgstack-pool";
pub(crate) const RAW: &str = "tokio-postgres";
/// tokio-postgres's own pipelining: a few clients, each shared by many
/// tasks (`--phases` only).
pub(crate) const RAW_SHARED: &str = "tokio-postgres, 4 shared clients";
/// The clients of [`RAW_SHARED`], as many as pgstack's default lanes.
pub(crate) const RAW_SHARED_CLIENTS: usize = 4;
pub(crate) const BB8: &str = "bb8-postgres";
pub(crate) const DEADPOOL: &str = "deadpool-postgres";
pub(crate) const SQLX: &str = "sqlx";

/// The pool peers (every library but raw tokio-postgres).
pub(crate) type Bb8Pool = bb8::Pool<bb8_postgres::PostgresConnectionManager<NoTls>>;

/// pgstack's configuration for the benchmark: the development profile's
/// defaults (TLS off, breaker, retries, health monitor, slow-query log),
/// with `pool_size` connections warmed at start and no migrations at start.
pub(crate) fn pgstack_config(url: &str, pool_size: u32) -> anyhow::Result<DatabaseConfig> {
    let mut config = DatabaseConfig::for_environment(Environment::Development);
    config.primary = pgstack::config::NodeSettings::from_url(url)?;
    config.pool.max_size = pool_size;
    config.pool.min_idle = pool_size;
    config.migrations.auto_migrate = false;
    Ok(config)
}

/// `--shared-connections`, when given.
static SHARED_CONNECTIONS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

/// Sets the facade's shared connections per node for the whole run.
pub(crate) fn set_shared_connections(lanes: Option<usize>) {
    if let Some(lanes) = lanes {
        let _ = SHARED_CONNECTIONS.set(lanes);
    }
}

/// The facade's shared connections per node when `--shared-connections`
/// changed them.
pub(crate) fn shared_connections() -> Option<usize> {
    SHARED_CONNECTIONS.get().copied()
}

/// The facade, connected.
pub(crate) async fn pgstack(config: DatabaseConfig) -> anyhow::Result<Database> {
    let mut options = pgstack::StartOptions::new();
    if let Some(lanes) = shared_connections() {
        options = options.shared_connections(lanes);
    }
    Database::builder()
        .config(config)
        .options(options)
        .connect()
        .await
        .context("starting pgstack's Database")
}

/// pgstack's pool on its own, with its defaults.
pub(crate) async fn pgstack_pool(url: &str, size: u32) -> anyhow::Result<pgstack::pool::Pool> {
    let node = pgstack::config::NodeSettings::from_url(url)?;
    let settings = pgstack::config::PoolSettings {
        max_size: size,
        min_idle: size,
        ..Default::default()
    };
    Ok(pgstack::pool::Pool::builder(node)
        .pool_settings(settings)
        .build()
        .await?)
}

/// bb8 with bb8-postgres, its defaults (a `simple_query("")` ping on every checkout).
pub(crate) async fn bb8(url: &str, size: u32) -> anyhow::Result<Bb8Pool> {
    let manager = bb8_postgres::PostgresConnectionManager::new_from_stringlike(url, NoTls)?;
    Ok(bb8::Pool::builder().max_size(size).build(manager).await?)
}

/// deadpool-postgres, its defaults (`RecyclingMethod::Fast`: `is_closed` only).
pub(crate) fn deadpool(url: &str, size: usize) -> anyhow::Result<deadpool_postgres::Pool> {
    let config: tokio_postgres::Config = url.parse()?;
    let manager = deadpool_postgres::Manager::from_config(
        config,
        NoTls,
        deadpool_postgres::ManagerConfig::default(),
    );
    Ok(deadpool_postgres::Pool::builder(manager)
        .max_size(size)
        .build()?)
}

/// sqlx's `PgPool`, its defaults (a ping before every acquire).
pub(crate) async fn sqlx(url: &str, size: u32) -> anyhow::Result<sqlx::PgPool> {
    Ok(sqlx::postgres::PgPoolOptions::new()
        .max_connections(size)
        .connect(url)
        .await?)
}

/// One raw tokio-postgres client with its connection task.
pub(crate) async fn raw(url: &str) -> anyhow::Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

// ----- case 1: checkout and return, no query ---------------------------

pub(crate) struct PgstackCheckout(pub(crate) Database);
pub(crate) struct PoolCheckout(pub(crate) pgstack::pool::Pool);
pub(crate) struct Bb8Checkout(pub(crate) Bb8Pool);
pub(crate) struct DeadpoolCheckout(pub(crate) deadpool_postgres::Pool);
pub(crate) struct SqlxCheckout(pub(crate) sqlx::PgPool);

impl Worker for PgstackCheckout {
    async fn call(&mut self) -> anyhow::Result<()> {
        drop(self.0.connection("checkout", Route::Write).await?);
        Ok(())
    }
}

impl Worker for PoolCheckout {
    async fn call(&mut self) -> anyhow::Result<()> {
        drop(self.0.get("checkout").await?);
        Ok(())
    }
}

impl Worker for Bb8Checkout {
    async fn call(&mut self) -> anyhow::Result<()> {
        drop(self.0.get().await?);
        Ok(())
    }
}

impl Worker for DeadpoolCheckout {
    async fn call(&mut self) -> anyhow::Result<()> {
        drop(self.0.get().await?);
        Ok(())
    }
}

impl Worker for SqlxCheckout {
    async fn call(&mut self) -> anyhow::Result<()> {
        drop(self.0.acquire().await?);
        Ok(())
    }
}

// ----- case 2 (and 4, 5): statements -----------------------------------

/// The statement a case runs.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Query {
    /// `SELECT 1`.
    Select1,
    /// A bill by primary key, ids drawn from `1..=rows`.
    Lookup { rows: i64 },
}

pub(crate) const SELECT_1: &str = "SELECT 1";
pub(crate) const LOOKUP: &str = "SELECT id, number, title FROM bills WHERE id = $1";

impl Query {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Query::Select1 => "SELECT 1",
            Query::Lookup { .. } => "bill by id",
        }
    }

    pub(crate) fn sql(self) -> &'static str {
        match self {
            Query::Select1 => SELECT_1,
            Query::Lookup { .. } => LOOKUP,
        }
    }
}

/// A small, fast generator of ids (xorshift), one per task.
#[derive(Clone, Debug)]
pub(crate) struct Ids(u64);

impl Ids {
    pub(crate) fn new(seed: u64) -> Ids {
        Ids(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub(crate) fn next(&mut self, rows: i64) -> i64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        let rows = u64::try_from(rows.max(1)).unwrap_or(1);
        i64::try_from(x % rows).unwrap_or(0) + 1
    }
}

fn check_pg_row(q: Query, row: &tokio_postgres::Row) -> anyhow::Result<()> {
    match q {
        Query::Select1 => {
            let one: i32 = row.try_get(0)?;
            anyhow::ensure!(one == 1, "SELECT 1 gave {one}");
        }
        Query::Lookup { .. } => {
            let _id: i64 = row.try_get(0)?;
            let _number: &str = row.try_get(1)?;
            let _title: &str = row.try_get(2)?;
        }
    }
    Ok(())
}

/// Through the whole facade: routing, breaker, retries, metrics, tracing.
#[derive(Clone)]
pub(crate) struct PgstackStatement {
    pub(crate) db: Database,
    pub(crate) q: Query,
    pub(crate) ids: Ids,
}

impl Worker for PgstackStatement {
    async fn call(&mut self) -> anyhow::Result<()> {
        let row = match self.q {
            Query::Select1 => {
                self.db
                    .query_one("select-1", Route::Read, SELECT_1, &[])
                    .await?
            }
            Query::Lookup { rows } => {
                let id = self.ids.next(rows);
                self.db
                    .query_one("bill-by-id", Route::Read, LOOKUP, &[&id])
                    .await?
            }
        };
        check_pg_row(self.q, &row)
    }
}

/// A connected client and its prepared statement.
pub(crate) struct Prepared {
    pub(crate) client: Client,
    pub(crate) statement: Statement,
}

impl Prepared {
    async fn connect(url: &str, q: Query) -> anyhow::Result<std::sync::Arc<Prepared>> {
        let client = raw(url).await?;
        let statement = client.prepare(q.sql()).await?;
        Ok(std::sync::Arc::new(Prepared { client, statement }))
    }
}

/// Raw tokio-postgres, prepared once, no pool: a client of its own
/// ([`RawStatement::connect`]), or one shared with other tasks, which
/// tokio-postgres pipelines on its one connection ([`RawStatement::shared`]).
pub(crate) struct RawStatement {
    pub(crate) prepared: std::sync::Arc<Prepared>,
    pub(crate) q: Query,
    pub(crate) ids: Ids,
}

impl RawStatement {
    pub(crate) async fn connect(url: &str, q: Query, seed: u64) -> anyhow::Result<RawStatement> {
        Ok(RawStatement {
            prepared: Prepared::connect(url, q).await?,
            q,
            ids: Ids::new(seed),
        })
    }

    /// `tasks` workers over [`RAW_SHARED_CLIENTS`] clients.
    pub(crate) async fn shared(
        url: &str,
        q: Query,
        tasks: usize,
    ) -> anyhow::Result<Vec<RawStatement>> {
        let mut clients = Vec::with_capacity(RAW_SHARED_CLIENTS);
        for _ in 0..RAW_SHARED_CLIENTS {
            clients.push(Prepared::connect(url, q).await?);
        }
        Ok((0..tasks)
            .map(|i| RawStatement {
                prepared: std::sync::Arc::clone(&clients[i % RAW_SHARED_CLIENTS]),
                q,
                ids: Ids::new(i as u64),
            })
            .collect())
    }
}

impl Worker for RawStatement {
    async fn call(&mut self) -> anyhow::Result<()> {
        let Prepared { client, statement } = &*self.prepared;
        let row = match self.q {
            Query::Select1 => client.query_one(statement, &[]).await?,
            Query::Lookup { rows } => {
                let id = self.ids.next(rows);
                client.query_one(statement, &[&id]).await?
            }
        };
        check_pg_row(self.q, &row)
    }
}

/// One client per task that reconnects after an error, as a program
/// without a pool would (case 5).
pub(crate) struct RawReconnecting {
    pub(crate) url: String,
    pub(crate) current: Option<RawStatement>,
    pub(crate) q: Query,
    pub(crate) seed: u64,
}

impl Worker for RawReconnecting {
    async fn call(&mut self) -> anyhow::Result<()> {
        if self
            .current
            .as_ref()
            .is_none_or(|c| c.prepared.client.is_closed())
        {
            self.current = None;
            self.seed += 1;
            self.current = Some(RawStatement::connect(&self.url, self.q, self.seed).await?);
        }
        let Some(current) = self.current.as_mut() else {
            anyhow::bail!("no client");
        };
        let result = current.call().await;
        if result.is_err() {
            self.current = None;
        }
        result
    }
}

/// bb8: tokio-postgres's `Client` has no statement cache, so a statement
/// given as text is prepared on every call (as bb8-postgres's users do).
#[derive(Clone)]
pub(crate) struct Bb8Statement {
    pub(crate) pool: Bb8Pool,
    pub(crate) q: Query,
    pub(crate) ids: Ids,
}

impl Worker for Bb8Statement {
    async fn call(&mut self) -> anyhow::Result<()> {
        let conn = self.pool.get().await?;
        let row = match self.q {
            Query::Select1 => conn.query_one(SELECT_1, &[]).await?,
            Query::Lookup { rows } => {
                let id = self.ids.next(rows);
                conn.query_one(LOOKUP, &[&id]).await?
            }
        };
        check_pg_row(self.q, &row)
    }
}

/// deadpool-postgres with its per-connection statement cache (`prepare_cached`).
#[derive(Clone)]
pub(crate) struct DeadpoolStatement {
    pub(crate) pool: deadpool_postgres::Pool,
    pub(crate) q: Query,
    pub(crate) ids: Ids,
}

impl Worker for DeadpoolStatement {
    async fn call(&mut self) -> anyhow::Result<()> {
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(self.q.sql()).await?;
        let row = match self.q {
            Query::Select1 => client.query_one(&statement, &[]).await?,
            Query::Lookup { rows } => {
                let id = self.ids.next(rows);
                client.query_one(&statement, &[&id]).await?
            }
        };
        check_pg_row(self.q, &row)
    }
}

/// sqlx with its per-connection statement cache (the default).
#[derive(Clone)]
pub(crate) struct SqlxStatement {
    pub(crate) pool: sqlx::PgPool,
    pub(crate) q: Query,
    pub(crate) ids: Ids,
}

impl Worker for SqlxStatement {
    async fn call(&mut self) -> anyhow::Result<()> {
        match self.q {
            Query::Select1 => {
                let row = sqlx::query(SELECT_1).fetch_one(&self.pool).await?;
                let one: i32 = row.try_get(0)?;
                anyhow::ensure!(one == 1, "SELECT 1 gave {one}");
            }
            Query::Lookup { rows } => {
                let id = self.ids.next(rows);
                let row = sqlx::query(LOOKUP).bind(id).fetch_one(&self.pool).await?;
                let _id: i64 = row.try_get(0)?;
                let _number: &str = row.try_get(1)?;
                let _title: &str = row.try_get(2)?;
            }
        }
        Ok(())
    }
}

/// Waits for `future`, at most `limit`.
pub(crate) async fn capped<T>(
    limit: Duration,
    future: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(limit, future).await {
        Ok(result) => result,
        Err(_) => Err(anyhow::anyhow!("still waiting after {limit:?} (capped)")),
    }
}
