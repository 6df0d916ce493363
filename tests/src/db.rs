//! [`TestDb`]: a fresh database for one test.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::OnceCell;
use tokio_postgres::Client;

use crate::cluster::{TestCluster, connect};
use pgstack_localpg::Error as KitError;

/// A fresh, empty database created for one test and dropped afterwards.
///
/// [`TestDb::new`] creates it on the server named by `DATABASE_URL` when that
/// is set, and otherwise on a throwaway [`TestCluster`] shared by the whole test
/// binary (started on first use, removed when the binary exits).
/// [`TestDb::on`] and [`TestDb::on_url`] choose the server explicitly.
///
/// Dropping it runs `DROP DATABASE ... WITH (FORCE)` (on a separate thread with
/// its own small runtime, since `Drop` is synchronous), which also ends any
/// connection still open to it.
///
/// ```no_run
/// # async fn demo() -> anyhow::Result<()> {
/// let db = pgstack_tests::TestDb::new().await?;
/// let client = db.client().await?;
/// client.batch_execute("CREATE TABLE bills (id int)").await?;
/// // db.url() is what the code under test connects to.
/// # Ok(())
/// # }
/// ```
pub struct TestDb {
    name: String,
    url: String,
    admin_url: String,
    describe: String,
}

impl fmt::Debug for TestDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestDb")
            .field("name", &self.name)
            .field("server", &self.describe)
            .finish()
    }
}

/// The shared throwaway cluster of this test binary. Holds no runtime objects,
/// so every test's runtime may use it.
static SHARED: OnceCell<TestCluster> = OnceCell::const_new();

/// Makes database names unique within the process.
static COUNTER: AtomicU64 = AtomicU64::new(0);

fn unique_name() -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.subsec_nanos())
        .unwrap_or(0);
    format!("pgstack_test_{}_{n}_{nanos:09}", std::process::id())
}

/// Quotes an SQL identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The URL with its password hidden, for messages.
pub(crate) fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("REDACTED"));
            parsed.to_string()
        }
        Ok(parsed) => parsed.to_string(),
        Err(_) => {
            // key=value form: drop the password pair.
            url.split_whitespace()
                .map(|pair| {
                    if pair.starts_with("password=") {
                        "password=REDACTED"
                    } else {
                        pair
                    }
                })
                .collect::<Vec<_>>()
                .join(" ")
        }
    }
}

/// `base` with its database replaced by `database`. Accepts URLs
/// (`postgres://...`, `postgresql://...`) and `key=value` strings.
fn with_database(base: &str, database: &str) -> Result<String, KitError> {
    let trimmed = base.trim();
    if trimmed.starts_with("postgres://") || trimmed.starts_with("postgresql://") {
        let mut parsed = url::Url::parse(trimmed).map_err(|error| KitError::BadUrl {
            reason: format!("{error} (expected postgres://user@host:port/database)"),
        })?;
        parsed.set_path(&format!("/{database}"));
        Ok(parsed.to_string())
    } else if trimmed.contains('=') {
        let kept: Vec<&str> = trimmed
            .split_whitespace()
            .filter(|pair| !pair.starts_with("dbname="))
            .collect();
        Ok(format!("{} dbname={database}", kept.join(" ")))
    } else {
        Err(KitError::BadUrl {
            reason: "expected postgres://user@host:port/database or key=value pairs".to_owned(),
        })
    }
}

impl TestDb {
    /// A fresh database on `DATABASE_URL`'s server when it is set, else on
    /// this test binary's shared throwaway cluster.
    pub async fn new() -> anyhow::Result<TestDb> {
        match std::env::var("DATABASE_URL") {
            Ok(url) if !url.trim().is_empty() => TestDb::on_url(&url).await,
            _ => {
                let cluster = TestDb::shared_cluster().await?;
                TestDb::on(cluster).await
            }
        }
    }

    /// The throwaway cluster shared by this test binary (started on first
    /// use; its server is removed when the binary exits).
    ///
    /// Every test of the binary uses it at the same time: do not stop, kill
    /// or reconfigure it — start a [`TestCluster`] of your own for that.
    pub async fn shared_cluster() -> anyhow::Result<&'static TestCluster> {
        SHARED.get_or_try_init(TestCluster::start).await
    }

    /// A fresh database on `cluster`.
    pub async fn on(cluster: &TestCluster) -> anyhow::Result<TestDb> {
        TestDb::on_url(&cluster.url("postgres")).await
    }

    /// A fresh database on the server `base_url` points at (its database is
    /// where `CREATE DATABASE` and `DROP DATABASE` run; the user needs the
    /// `CREATEDB` privilege). Use this rather than changing `DATABASE_URL` in
    /// the process environment. The kit connects without TLS.
    pub async fn on_url(base_url: &str) -> anyhow::Result<TestDb> {
        let describe = redact(base_url);
        // Validate and normalise the base before connecting.
        let name = unique_name();
        let url = with_database(base_url, &name)?;
        let admin_url = base_url.trim().to_owned();
        let admin = connect(&admin_url, &describe).await?;
        admin
            .batch_execute(&format!("CREATE DATABASE {}", quote_ident(&name)))
            .await
            .map_err(|source| {
                KitError::pg(format!("CREATE DATABASE {name} on {describe}"), source)
            })?;
        tracing::debug!(%name, server = %describe, "test database created");
        Ok(TestDb {
            name,
            url,
            admin_url,
            describe,
        })
    }

    /// The URL of the fresh database (it carries the base URL's password, if
    /// any: do not log it).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A connection to the fresh database; its connection task is spawned on
    /// the current runtime.
    pub async fn client(&self) -> anyhow::Result<Client> {
        let describe = format!("test database {} on {}", self.name, self.describe);
        Ok(connect(&self.url, &describe).await?)
    }
}

async fn drop_database(admin_url: &str, name: &str, describe: &str) -> Result<(), KitError> {
    let admin = connect(admin_url, describe).await?;
    let quoted = quote_ident(name);
    let forced = admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {quoted} WITH (FORCE)"))
        .await;
    if let Err(error) = forced {
        // Servers before 13 have no FORCE: end the sessions, then drop.
        tracing::debug!(%error, "DROP DATABASE WITH (FORCE) failed; retrying without FORCE");
        let _ = admin
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                &[&name],
            )
            .await;
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {quoted}"))
            .await
            .map_err(|source| KitError::pg(format!("DROP DATABASE {name}"), source))?;
    }
    Ok(())
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        let describe = self.describe.clone();
        let worker = std::thread::Builder::new()
            .name("pgstack-testdb-drop".to_owned())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                match runtime {
                    Ok(runtime) => runtime.block_on(async {
                        match tokio::time::timeout(
                            Duration::from_secs(30),
                            drop_database(&admin_url, &name, &describe),
                        )
                        .await
                        {
                            Ok(Ok(())) => tracing::debug!(%name, "test database dropped"),
                            Ok(Err(error)) => {
                                tracing::warn!(%error, %name, "dropping a test database")
                            }
                            Err(_) => tracing::warn!(%name, "dropping a test database timed out"),
                        }
                    }),
                    Err(error) => tracing::warn!(%error, "no runtime to drop a test database"),
                }
            });
        match worker {
            Ok(worker) => {
                let _ = worker.join();
            }
            Err(error) => tracing::warn!(%error, "no thread to drop a test database"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_get_the_new_database() {
        assert_eq!(
            with_database(
                "postgres://u:secret@db.example:5433/app?sslmode=disable",
                "x"
            )
            .ok(),
            Some("postgres://u:secret@db.example:5433/x?sslmode=disable".to_owned())
        );
        assert_eq!(
            with_database("host=h port=1 dbname=app user=u", "x").ok(),
            Some("host=h port=1 user=u dbname=x".to_owned())
        );
        assert!(with_database("not a url", "x").is_err());
    }

    #[test]
    fn passwords_are_redacted() {
        let shown = redact("postgres://u:secret@h/db");
        assert!(!shown.contains("secret"), "{shown}");
        let shown = redact("host=h password=secret user=u");
        assert!(!shown.contains("secret"), "{shown}");
    }
}
