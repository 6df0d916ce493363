//! [`TestCluster`]: a throwaway PostgreSQL server.

use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use pgstack_localpg::Error as KitError;
use pgstack_localpg::{Layout, PgBinaries, Server, free_port};

/// The address every kit server listens on.
const HOST: &str = "127.0.0.1";

/// A throwaway PostgreSQL server — a primary, or a streaming replica of one.
///
/// [`TestCluster::start`] copies an `initdb`-made template (made once, kept in
/// the temporary folder), picks a free port, writes test settings (fsync off, `wal_level = replica`,
/// 300 connections, trust authentication, ...) and starts the server as the
/// `postgres` user when the tests run as root. The data directory, the Unix
/// socket folder and the log live in a fresh folder under the system's
/// temporary directory.
///
/// Dropping the cluster stops the server (immediate shutdown) and deletes its
/// folder — unless the thread is panicking (or `PGSTACK_KIT_KEEP=1` is set):
/// then the folder is kept and its log path written to standard error. A
/// watchdog process removes the server if the test process dies without
/// dropping it (a `static`, a `kill -9`).
///
/// Every method works from any tokio runtime: the cluster holds no runtime
/// objects, and its blocking work runs on the runtime's blocking pool.
///
/// ```no_run
/// # async fn demo() -> anyhow::Result<()> {
/// use pgstack_tests::TestCluster;
///
/// let primary = TestCluster::start().await?;
/// let replica = primary.replica().await?;
/// primary.client("postgres").await?.batch_execute("CREATE TABLE t (id int)").await?;
/// replica.wait_for_replay().await?;
/// primary.kill9().await?;
/// primary.start_again().await?; // crash recovery
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct TestCluster {
    server: Server,
    port: u16,
    primary_port: Option<u16>,
    watchdog: Mutex<Option<Child>>,
}

/// Runs blocking kit work on the runtime's blocking pool.
pub(crate) async fn blocking<T, F>(work: F) -> anyhow::Result<T>
where
    F: FnOnce() -> anyhow::Result<T> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| anyhow::anyhow!("the kit's blocking task failed: {error}"))?
}

/// Connects with tokio-postgres (no TLS) and spawns the connection task on the
/// current runtime.
pub(crate) async fn connect(url: &str, describe: &str) -> Result<Client, KitError> {
    let mut config: tokio_postgres::Config = url.parse().map_err(|source| {
        KitError::pg(
            format!("parsing the connection string for {describe}"),
            source,
        )
    })?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|source| KitError::pg(format!("connecting to {describe}"), source))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "test connection ended");
        }
    });
    Ok(client)
}

/// The kit's watchdog: removes the server in `layout` if the test process
/// dies without dropping its cluster; keeps the files when `PGSTACK_KIT_KEEP`
/// is set.
fn spawn_watchdog(layout: &Layout) -> Result<Child, KitError> {
    pgstack_localpg::spawn_watchdog(layout, keep_requested())
}

fn new_root(prefix: &str) -> Result<PathBuf, KitError> {
    Ok(tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .map_err(|source| KitError::io("creating a temporary folder", source))?
        .keep())
}

impl TestCluster {
    /// Starts a fresh primary on its own free port, with the binaries found by
    /// [`PgBinaries::find`].
    pub async fn start() -> anyhow::Result<TestCluster> {
        blocking(|| {
            let bins = PgBinaries::find()?;
            TestCluster::start_blocking(bins)
        })
        .await
    }

    /// Starts a fresh primary with the given binaries.
    pub async fn start_with(bins: PgBinaries) -> anyhow::Result<TestCluster> {
        blocking(move || TestCluster::start_blocking(bins)).await
    }

    fn start_blocking(bins: PgBinaries) -> anyhow::Result<TestCluster> {
        let root = new_root("pgstack-kit-")?;
        let server = Server::new(bins, Layout::in_root(&root));
        // From here on, Drop cleans up whatever happens.
        let mut cluster = TestCluster {
            server,
            port: 0,
            primary_port: None,
            watchdog: Mutex::new(None),
        };
        cluster.server.prepare_root()?;
        cluster.set_watchdog(spawn_watchdog(cluster.server.layout())?);
        cluster.server.init_from_template()?;
        cluster.port = cluster.server.start(free_port()?, true)?;
        tracing::debug!(port = cluster.port, root = %root.display(), "test cluster started");
        Ok(cluster)
    }

    fn set_watchdog(&self, child: Child) {
        if let Ok(mut slot) = self.watchdog.lock() {
            *slot = Some(child);
        }
    }

    /// `"127.0.0.1"`.
    pub fn host(&self) -> &str {
        HOST
    }

    /// The TCP port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// `postgres://postgres@127.0.0.1:PORT/DATABASE` (trust authentication, no
    /// password).
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@{HOST}:{}/{database}", self.port)
    }

    /// A connection to `database` as `postgres`; its connection task is
    /// spawned on the current runtime.
    pub async fn client(&self, database: &str) -> anyhow::Result<Client> {
        let describe = format!("{HOST}:{}/{database}", self.port);
        Ok(connect(&self.url(database), &describe).await?)
    }

    /// The server log (kept across restarts).
    pub fn log_path(&self) -> PathBuf {
        self.server.layout().log.clone()
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.server.layout().data
    }

    /// The Unix socket folder (`None` when its path would be too long for a
    /// socket and Unix sockets are off).
    pub fn socket_dir(&self) -> Option<&Path> {
        self.server.layout().sock.as_deref()
    }

    /// The last `lines` lines of the server log.
    pub fn log_tail(&self, lines: usize) -> String {
        self.server.log_tail(lines)
    }

    /// The binaries this server runs.
    pub fn binaries(&self) -> &PgBinaries {
        self.server.binaries()
    }

    /// Whether this is a replica made by [`TestCluster::replica`].
    pub fn is_replica(&self) -> bool {
        self.primary_port.is_some()
    }

    /// For a replica: the port of its primary.
    pub fn primary_port(&self) -> Option<u16> {
        self.primary_port
    }

    /// Whether a postmaster runs on the data directory right now.
    pub fn is_running(&self) -> bool {
        self.server.is_running()
    }

    /// Fast shutdown (`pg_ctl stop -m fast`); returns once the server is down.
    /// Nothing to do when it is not running.
    pub async fn stop(&self) -> anyhow::Result<()> {
        let server = self.server.clone();
        blocking(move || Ok(server.stop_fast()?)).await
    }

    /// Immediate shutdown (SIGQUIT): no checkpoint, crash recovery on the next
    /// start.
    pub async fn stop_immediate(&self) -> anyhow::Result<()> {
        let server = self.server.clone();
        blocking(move || Ok(server.stop_immediate()?)).await
    }

    /// Starts a stopped or killed server again on the same port (a stale
    /// `postmaster.pid` is removed); returns once it accepts connections.
    pub async fn start_again(&self) -> anyhow::Result<()> {
        let server = self.server.clone();
        let port = self.port;
        blocking(move || {
            if server.is_running() {
                return Ok(());
            }
            server.start(port, false)?;
            Ok(())
        })
        .await
    }

    /// [`stop`](TestCluster::stop), then [`start_again`](TestCluster::start_again).
    pub async fn restart(&self) -> anyhow::Result<()> {
        self.stop().await?;
        self.start_again().await
    }

    /// SIGKILL to the postmaster (first line of `postmaster.pid`) and to every
    /// process of its group; returns once the postmaster is dead. Clients see
    /// their connections drop.
    ///
    /// The kit runs with `synchronous_commit = off`, so a commit is
    /// acknowledged before its WAL is written. Before the kill, the kit waits
    /// (up to 2 s) until the WAL writer has written everything inserted so far,
    /// so commits acknowledged before `kill9` survive it, as they would with
    /// PostgreSQL's default `synchronous_commit = on`. Transactions still in
    /// flight are lost, as in a real crash.
    pub async fn kill9(&self) -> anyhow::Result<()> {
        if !self.is_replica()
            && let Err(error) = self.wait_for_wal_write(Duration::from_secs(2)).await
        {
            tracing::debug!(%error, "could not wait for the WAL writer before kill -9");
        }
        let server = self.server.clone();
        blocking(move || Ok(server.kill9()?)).await
    }

    /// Waits until the WAL inserted so far has been written out.
    async fn wait_for_wal_write(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        let client = self.client("postgres").await?;
        let target = wal_end(&client).await?;
        loop {
            let flushed: String = client
                .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
                .await?
                .get(0);
            let flushed = parse_lsn(&flushed)?;
            if flushed >= target {
                return Ok(());
            }
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "the WAL writer is {} bytes behind after {within:?}",
                    target - flushed
                );
            }
            real_sleep(Duration::from_millis(5)).await?;
        }
    }

    /// Ends every client session (`pg_terminate_backend`) except the one
    /// asking, as an administrator or a failover would; the server keeps
    /// running. Returns how many sessions were ended. Their clients get
    /// SQLSTATE 57P01 (`admin_shutdown`) or a closed connection.
    pub async fn terminate_backends(&self) -> anyhow::Result<u64> {
        let client = self.client("postgres").await?;
        let ended: i64 = client
            .query_one(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .map_err(|source| KitError::pg("pg_terminate_backend()", source))?
            .get(0);
        Ok(u64::try_from(ended).unwrap_or(0))
    }

    /// A streaming standby of this server: `pg_basebackup -R -X stream` into a
    /// new folder, its own port, hot standby, started and accepting read-only
    /// connections.
    pub async fn replica(&self) -> anyhow::Result<TestCluster> {
        let bins = self.server.binaries().clone();
        let primary_port = self.port;
        blocking(move || {
            let root = new_root("pgstack-kit-replica-")?;
            let server = Server::new(bins, Layout::in_root(&root));
            let mut replica = TestCluster {
                server,
                port: 0,
                primary_port: Some(primary_port),
                watchdog: Mutex::new(None),
            };
            replica.server.prepare_root()?;
            replica.set_watchdog(spawn_watchdog(replica.server.layout())?);
            replica.server.base_backup_from(primary_port)?;
            replica.port = replica.server.start(free_port()?, true)?;
            tracing::debug!(port = replica.port, primary_port, "test replica started");
            Ok(replica)
        })
        .await
    }

    fn require_replica(&self, what: &str) -> Result<u16, KitError> {
        self.primary_port.ok_or_else(|| {
            KitError::NotApplicable(format!(
                "{what} needs a replica (made by TestCluster::replica); the server on port {} is a primary",
                self.port
            ))
        })
    }

    /// On a replica: pauses WAL replay (`pg_wal_replay_pause()`) and waits
    /// until replay has actually stopped. WAL is still received.
    pub async fn pause_replay(&self) -> anyhow::Result<()> {
        self.require_replica("pause_replay")?;
        let client = self.client("postgres").await?;
        client
            .batch_execute("SELECT pg_wal_replay_pause()")
            .await
            .map_err(|source| KitError::pg("pg_wal_replay_pause()", source))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let state: String = client
                .query_one("SELECT pg_get_wal_replay_pause_state()", &[])
                .await
                .map_err(|source| KitError::pg("pg_get_wal_replay_pause_state()", source))?
                .get(0);
            if state == "paused" {
                return Ok(());
            }
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "replay on port {} did not pause within 10 s (state {state})",
                    self.port
                );
            }
            real_sleep(Duration::from_millis(10)).await?;
        }
    }

    /// On a replica: resumes WAL replay (`pg_wal_replay_resume()`).
    pub async fn resume_replay(&self) -> anyhow::Result<()> {
        self.require_replica("resume_replay")?;
        self.client("postgres")
            .await?
            .batch_execute("SELECT pg_wal_replay_resume()")
            .await
            .map_err(|source| KitError::pg("pg_wal_replay_resume()", source))?;
        Ok(())
    }

    async fn primary_client(&self, what: &str) -> anyhow::Result<Client> {
        let primary_port = self.require_replica(what)?;
        Ok(connect(
            &format!("postgres://postgres@{HOST}:{primary_port}/postgres"),
            &format!("the primary {HOST}:{primary_port}"),
        )
        .await?)
    }

    /// On a replica: how many bytes of WAL its primary has inserted that this
    /// replica has not replayed yet (`pg_current_wal_insert_lsn()` on the
    /// primary minus `pg_last_wal_replay_lsn()` here). 0 when caught up.
    pub async fn replay_lag_bytes(&self) -> anyhow::Result<u64> {
        let primary = self.primary_client("replay_lag_bytes").await?;
        let target = wal_end(&primary).await?;
        let replica = self.client("postgres").await?;
        let replayed = replay_lsn(&replica).await?;
        Ok(target.saturating_sub(replayed))
    }

    /// On a replica: waits (up to 30 s) until it has replayed everything its
    /// primary had inserted into its WAL when the call began.
    pub async fn wait_for_replay(&self) -> anyhow::Result<()> {
        self.wait_for_replay_within(Duration::from_secs(30)).await
    }

    /// [`wait_for_replay`](TestCluster::wait_for_replay) with a bound.
    pub async fn wait_for_replay_within(&self, within: Duration) -> anyhow::Result<()> {
        let primary = self.primary_client("wait_for_replay").await?;
        let target = wal_end(&primary).await?;
        let replica = self.client("postgres").await?;
        let deadline = Instant::now() + within;
        loop {
            let replayed = replay_lsn(&replica).await?;
            if replayed >= target {
                return Ok(());
            }
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "the replica on port {} is still {} bytes behind its primary after {within:?}",
                    self.port,
                    target - replayed
                );
            }
            real_sleep(Duration::from_millis(20)).await?;
        }
    }

    /// On a replica: promotes it to a primary (`pg_ctl promote -w`).
    pub async fn promote(&self) -> anyhow::Result<()> {
        self.require_replica("promote")?;
        let server = self.server.clone();
        blocking(move || Ok(server.promote()?)).await
    }
}

/// Parses an LSN (`"0/3000028"`).
fn parse_lsn(text: &str) -> anyhow::Result<u64> {
    let (high, low) = text
        .split_once('/')
        .ok_or_else(|| anyhow::anyhow!("not an LSN: {text:?}"))?;
    let high = u64::from_str_radix(high, 16)?;
    let low = u64::from_str_radix(low, 16)?;
    Ok((high << 32) | low)
}

/// The end of the WAL inserted so far on a primary. Right after a WAL switch
/// (a base backup does one), `pg_current_wal_insert_lsn()` points past the
/// header of an empty page, where no record ends yet: that header is not
/// counted, so a caught-up replica is at the target.
async fn wal_end(primary: &Client) -> anyhow::Result<u64> {
    let row = primary
        .query_one(
            "SELECT pg_current_wal_insert_lsn()::text, current_setting('wal_block_size')::int",
            &[],
        )
        .await
        .map_err(|source| KitError::pg("pg_current_wal_insert_lsn() on the primary", source))?;
    let lsn = parse_lsn(&row.get::<_, String>(0))?;
    let block = u64::try_from(row.get::<_, i32>(1)).unwrap_or(8192).max(1);
    let offset = lsn % block;
    // A short page header is 24 bytes, a long one (first page of a segment) 40.
    if offset == 24 || offset == 40 {
        Ok(lsn - offset)
    } else {
        Ok(lsn)
    }
}

/// `pg_last_wal_replay_lsn()` on a replica (0 before any replay).
async fn replay_lsn(replica: &Client) -> anyhow::Result<u64> {
    let replayed: Option<String> = replica
        .query_one("SELECT pg_last_wal_replay_lsn()::text", &[])
        .await
        .map_err(|source| KitError::pg("pg_last_wal_replay_lsn() on the replica", source))?
        .get(0);
    match replayed {
        Some(lsn) => parse_lsn(&lsn),
        None => Ok(0),
    }
}

/// Sleeps on the wall clock (a blocking-pool sleep), so polling loops work
/// under tokio's paused test clock too.
async fn real_sleep(duration: Duration) -> anyhow::Result<()> {
    blocking(move || {
        std::thread::sleep(duration);
        Ok(())
    })
    .await
}

/// `PGSTACK_KIT_KEEP=1`: keep every cluster's files (for tests that fail by
/// returning an error, which `Drop` cannot tell from success).
fn keep_requested() -> bool {
    std::env::var_os("PGSTACK_KIT_KEEP").is_some_and(|value| !value.is_empty() && value != "0")
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if let Err(error) = self.server.stop_immediate() {
            tracing::warn!(%error, "stopping a test cluster");
        }
        let watchdog = self.watchdog.lock().ok().and_then(|mut slot| slot.take());
        if let Some(mut watchdog) = watchdog {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
        let why = if std::thread::panicking() {
            Some("the test failed")
        } else if keep_requested() {
            Some("PGSTACK_KIT_KEEP is set")
        } else {
            None
        };
        match why {
            Some(why) => {
                // Keep the files and say where the log is. Written straight to
                // stderr (not captured) so it shows next to the failure.
                let _ = writeln!(
                    std::io::stderr(),
                    "pgstack-tests: {why}; kept the PostgreSQL server files of port {} in {} (log: {})",
                    self.port,
                    self.server.layout().root.display(),
                    self.server.layout().log.display()
                );
            }
            None => {
                if let Err(error) = self.server.remove_files() {
                    tracing::warn!(%error, "removing a test cluster's files");
                }
            }
        }
    }
}
