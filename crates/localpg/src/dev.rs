//! [`DevCluster`]: the persistent development server behind `pgstack db-up`
//! (and `cargo xtask db-up`).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_postgres::Client;

use crate::binaries::PgBinaries;
use crate::error::Error;
use crate::server::{Layout, Server, free_port, running_pid};

/// A PostgreSQL server whose files persist in one folder (by default
/// `target/pgstack-dev/`): the data directory `data/`, the socket folder
/// `sock/`, the log `server.log`, and a `state` file with the port and the
/// binaries used.
///
/// Unlike [`TestCluster`](crate::TestCluster) it has no watchdog and deletes
/// nothing when dropped: it is meant to outlive the process that started it.
/// Its methods block (they may be called inside or outside a tokio runtime).
///
/// ```no_run
/// # fn demo() -> Result<(), pgstack_localpg::Error> {
/// use pgstack_localpg::DevCluster;
///
/// let dev = DevCluster::open("target/pgstack-dev");
/// let up = dev.up()?; // idempotent
/// assert!(up.url.ends_with("/pgstack_dev"));
/// dev.down()?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct DevCluster {
    layout: Layout,
    state: PathBuf,
}

/// What [`DevCluster::up`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DevUp {
    /// It was already running (nothing was started).
    pub already_running: bool,
    /// The port it listens on.
    pub port: u16,
    /// `postgres://postgres@127.0.0.1:PORT/pgstack_dev`.
    pub url: String,
    /// The server's version (`SHOW server_version`).
    pub server_version: String,
}

/// What [`DevCluster::status`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DevStatus {
    /// A postmaster runs on the data directory.
    pub running: bool,
    /// The data directory has been initialised.
    pub initialized: bool,
    /// The port it listens (or last listened) on.
    pub port: Option<u16>,
    /// The development database's URL, when the port is known.
    pub url: Option<String>,
    /// The data directory.
    pub data_dir: PathBuf,
    /// The server log.
    pub log: PathBuf,
    /// The running server's version (`SHOW server_version`), or the data
    /// directory's major version (`PG_VERSION`) when it is stopped.
    pub server_version: Option<String>,
}

/// Runs async work on its own thread and runtime, so the blocking API works
/// whether or not the caller is inside a runtime.
fn on_own_runtime<T, F, Fut>(work: F) -> Result<T, Error>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, Error>>,
    T: Send + 'static,
{
    std::thread::Builder::new()
        .name("pgstack-dev".to_owned())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|source| Error::io("building a tokio runtime", source))?;
            runtime.block_on(work())
        })
        .map_err(|source| Error::io("starting a thread", source))?
        .join()
        .map_err(|_| Error::WorkerPanicked {
            what: "the development server".to_owned(),
        })?
}

/// Connects with tokio-postgres (no TLS) and spawns the connection task on the
/// current runtime.
async fn connect(url: &str, describe: &str) -> Result<Client, Error> {
    let mut config: tokio_postgres::Config = url.parse().map_err(|source| {
        Error::pg(
            format!("parsing the connection string for {describe}"),
            source,
        )
    })?;
    config.connect_timeout(Duration::from_secs(10));
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|source| Error::pg(format!("connecting to {describe}"), source))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "development server connection ended");
        }
    });
    Ok(client)
}

impl DevCluster {
    /// The development database [`DevCluster::up`] creates.
    pub const DATABASE: &'static str = "pgstack_dev";

    /// The cluster kept in `dir` (nothing is touched yet).
    pub fn open(dir: impl Into<PathBuf>) -> DevCluster {
        let dir = dir.into();
        DevCluster {
            layout: Layout::in_root(&dir),
            state: dir.join("state"),
        }
    }

    /// The folder holding everything.
    pub fn dir(&self) -> &Path {
        &self.layout.root
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.layout.data
    }

    /// The server log.
    pub fn log_path(&self) -> &Path {
        &self.layout.log
    }

    /// The state file (`port=...`, `bindir=...`).
    pub fn state_path(&self) -> &Path {
        &self.state
    }

    /// `postgres://postgres@127.0.0.1:PORT/pgstack_dev`.
    pub fn url_for(port: u16) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{port}/{}",
            DevCluster::DATABASE
        )
    }

    fn read_state(&self) -> (Option<u16>, Option<PathBuf>) {
        let text = std::fs::read_to_string(&self.state).unwrap_or_default();
        let mut port = None;
        let mut bindir = None;
        for line in text.lines() {
            if let Some(value) = line.strip_prefix("port=") {
                port = value.trim().parse().ok();
            } else if let Some(value) = line.strip_prefix("bindir=") {
                bindir = Some(PathBuf::from(value.trim()));
            }
        }
        (port, bindir)
    }

    fn write_state(&self, port: u16, bins: &PgBinaries) -> Result<(), Error> {
        let text = format!("port={port}\nbindir={}\n", bins.bindir().display());
        std::fs::write(&self.state, text)
            .map_err(|source| Error::io(format!("writing {}", self.state.display()), source))
    }

    /// The binaries: those recorded in the state file when still there,
    /// else [`PgBinaries::find`].
    fn binaries(&self) -> Result<PgBinaries, Error> {
        if let (_, Some(bindir)) = self.read_state()
            && let Ok(bins) = PgBinaries::in_dir(&bindir)
        {
            return Ok(bins);
        }
        PgBinaries::find()
    }

    fn data_major(&self) -> Option<String> {
        std::fs::read_to_string(self.layout.data.join("PG_VERSION"))
            .ok()
            .map(|text| text.trim().to_owned())
    }

    /// The port in the server's settings, else in the state file.
    fn known_port(&self) -> Option<u16> {
        let text = std::fs::read_to_string(self.layout.data.join("pgstack.conf")).ok();
        let configured = text.and_then(|text| {
            text.lines()
                .find_map(|line| line.trim().strip_prefix("port = "))
                .and_then(|port| port.trim().parse().ok())
        });
        configured.or(self.read_state().0)
    }

    /// Starts the server (running `initdb` first when the folder is new) and
    /// creates the `pgstack_dev` database if missing. Idempotent: when the
    /// server already runs it only checks the database.
    ///
    /// # Errors
    /// When no binaries are found, the data directory belongs to another
    /// major version or is not one, or the server does not start or answer.
    pub fn up(&self) -> Result<DevUp, Error> {
        let bins = self.binaries()?;
        let server = Server::new(bins.clone(), self.layout.clone());
        let mut already_running = false;
        let port = match (server.is_running(), self.known_port()) {
            (true, Some(port)) => {
                already_running = true;
                port
            }
            _ => {
                server.prepare_root()?;
                if let Some(major) = self.data_major() {
                    let have = bins.major_version()?;
                    if major != have.to_string() {
                        return Err(Error::VersionMismatch {
                            data_dir: self.layout.data.clone(),
                            data_major: major,
                            bindir: bins.bindir().to_path_buf(),
                            binaries_major: have,
                        });
                    }
                } else if self.layout.data.exists() {
                    return Err(Error::NotADataDirectory {
                        data_dir: self.layout.data.clone(),
                    });
                } else {
                    server.initdb()?;
                }
                let wanted = match self.known_port() {
                    Some(port) => port,
                    None => free_port()?,
                };
                server.start(wanted, true)?
            }
        };
        self.write_state(port, &bins)?;
        let admin = format!("postgres://postgres@127.0.0.1:{port}/postgres");
        let server_version = on_own_runtime(move || async move {
            let client = connect(&admin, "the development server").await?;
            let exists = client
                .query_opt(
                    "SELECT 1 FROM pg_database WHERE datname = $1",
                    &[&DevCluster::DATABASE],
                )
                .await
                .map_err(|source| Error::pg("looking for the development database", source))?
                .is_some();
            if !exists {
                client
                    .batch_execute(&format!("CREATE DATABASE {}", DevCluster::DATABASE))
                    .await
                    .map_err(|source| Error::pg("creating the development database", source))?;
            }
            let version: String = client
                .query_one("SHOW server_version", &[])
                .await
                .map_err(|source| Error::pg("SHOW server_version", source))?
                .get(0);
            Ok(version)
        })?;
        Ok(DevUp {
            already_running,
            port,
            url: DevCluster::url_for(port),
            server_version,
        })
    }

    /// Fast shutdown. Returns whether it was running.
    ///
    /// # Errors
    /// When `pg_ctl stop` fails.
    pub fn down(&self) -> Result<bool, Error> {
        if running_pid(&self.layout.data).is_none() {
            return Ok(false);
        }
        let server = Server::new(self.binaries()?, self.layout.clone());
        server.stop_fast()?;
        Ok(true)
    }

    /// Stops the server if it runs and deletes the whole folder.
    ///
    /// # Errors
    /// When the server does not stop or the folder cannot be removed.
    pub fn purge(&self) -> Result<(), Error> {
        self.down()?;
        match std::fs::remove_dir_all(&self.layout.root) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(Error::io(
                format!("removing {}", self.layout.root.display()),
                source,
            )),
        }
    }

    /// Whether it runs, where, and which version.
    ///
    /// # Errors
    /// None today (an unanswered version query leaves the version out); the
    /// `Result` leaves room for checks that can fail.
    pub fn status(&self) -> Result<DevStatus, Error> {
        let running = running_pid(&self.layout.data).is_some();
        let initialized = self.layout.data.join("PG_VERSION").is_file();
        let port = self.known_port();
        let mut server_version = self.data_major();
        if running && let Some(port) = port {
            let admin = format!("postgres://postgres@127.0.0.1:{port}/postgres");
            let version = on_own_runtime(move || async move {
                let client = connect(&admin, "the development server").await?;
                let version: String = client
                    .query_one("SHOW server_version", &[])
                    .await
                    .map_err(|source| Error::pg("SHOW server_version", source))?
                    .get(0);
                Ok(version)
            });
            match version {
                Ok(version) => server_version = Some(version),
                Err(error) => tracing::debug!(%error, "asking the development server its version"),
            }
        }
        Ok(DevStatus {
            running,
            initialized,
            port,
            url: port.map(DevCluster::url_for),
            data_dir: self.layout.data.clone(),
            log: self.layout.log.clone(),
            server_version,
        })
    }
}
