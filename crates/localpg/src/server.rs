//! The synchronous core: one PostgreSQL data directory and the server on it.
//!
//! Everything here blocks; async callers (the test kit) run it on tokio's
//! blocking pool, so it neither depends on a particular runtime nor on the
//! (possibly paused) tokio clock.

use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::binaries::{PgBinaries, run, tail};
use crate::error::Error;

/// How long a start may take before the kit gives up.
pub(crate) const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a stop may take.
pub(crate) const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How many times a start is retried on another port when the port was taken.
const PORT_ATTEMPTS: usize = 8;
/// The name of the settings file the kit writes into the data directory.
const SETTINGS_FILE: &str = "pgstack.conf";

/// Where a server keeps its files.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Layout {
    /// The folder holding everything below.
    pub root: PathBuf,
    /// The data directory.
    pub data: PathBuf,
    /// The Unix socket directory (`None`: the path would be too long, Unix
    /// sockets are off).
    pub sock: Option<PathBuf>,
    /// The server log.
    pub log: PathBuf,
}

impl Layout {
    /// The layout in `root`: `data/`, `sock/` (when its path is short enough
    /// for a socket) and `server.log`.
    pub fn in_root(root: &Path) -> Layout {
        let sock = root.join("sock");
        // sun_path holds 108 bytes including "/.s.PGSQL.NNNNN" and the NUL.
        let sock = (sock.as_os_str().len() <= 88).then_some(sock);
        Layout {
            root: root.to_path_buf(),
            data: root.join("data"),
            sock,
            log: root.join("server.log"),
        }
    }
}

/// The state of a process, from `/proc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProcState {
    Alive,
    /// Dead but not reaped (the container's init may never reap it).
    Zombie,
    Gone,
}

fn proc_state(pid: i32) -> ProcState {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next());
            match state {
                Some('Z') | Some('X') | Some('x') => ProcState::Zombie,
                _ => ProcState::Alive,
            }
        }
        Err(_) => {
            if Path::new("/proc/self/stat").exists() {
                ProcState::Gone
            } else {
                // No procfs: fall back to kill(pid, 0).
                match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
                    Ok(()) | Err(nix::errno::Errno::EPERM) => ProcState::Alive,
                    Err(_) => ProcState::Gone,
                }
            }
        }
    }
}

/// Whether a live (non-zombie) process of process group `pgid` exists. Without
/// procfs, answers false.
fn group_alive(pgid: i32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.filter_map(Result::ok).any(|entry| {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|name| name.parse::<i32>().ok()) else {
            return false;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return false;
        };
        // After the command name: state, ppid, pgrp, ...
        let Some((_, rest)) = stat.rsplit_once(')') else {
            return false;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next().unwrap_or("Z");
        let pgrp = fields.nth(1).and_then(|pgrp| pgrp.parse::<i32>().ok());
        pgrp == Some(pgid) && !matches!(state, "Z" | "X" | "x")
    })
}

/// Picks a port nobody listens on right now (the server may still lose a race
/// for it; starting retries on another port then).
///
/// # Errors
/// When no socket can be bound on 127.0.0.1.
pub fn free_port() -> Result<u16, Error> {
    let listener = TcpListener::bind(("127.0.0.1", 0))
        .map_err(|source| Error::io("finding a free port on 127.0.0.1", source))?;
    let port = listener
        .local_addr()
        .map_err(|source| Error::io("finding a free port on 127.0.0.1", source))?
        .port();
    Ok(port)
}

/// One data directory, its settings and the server running on it.
///
/// Every method blocks. Settings are written by [`Server::start`] into
/// `pgstack.conf` in the data directory (listening on 127.0.0.1 only, trust
/// authentication from `initdb`, fsync off, `wal_level = replica`): a server
/// for development and tests, never for data that matters.
#[derive(Debug, Clone)]
pub struct Server {
    bins: PgBinaries,
    layout: Layout,
}

/// Why a start failed.
enum StartFailure {
    PortInUse(Error),
    /// Leftovers of a killed server still exist (its last processes are
    /// dying): worth another try on the same port.
    Leftovers(Error),
    Other(Error),
}

impl Server {
    /// The server of `layout`, run with `bins` (nothing is touched yet).
    pub fn new(bins: PgBinaries, layout: Layout) -> Server {
        Server { bins, layout }
    }

    /// The binaries it runs.
    pub fn binaries(&self) -> &PgBinaries {
        &self.bins
    }

    /// Where it keeps its files.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Creates `layout.root` (if needed) and the socket folder, owned by the
    /// server user.
    pub fn prepare_root(&self) -> Result<(), Error> {
        let root = &self.layout.root;
        std::fs::create_dir_all(root)
            .map_err(|source| Error::io(format!("creating {}", root.display()), source))?;
        self.bins.give(root)?;
        if let Some(sock) = &self.layout.sock {
            std::fs::create_dir_all(sock)
                .map_err(|source| Error::io(format!("creating {}", sock.display()), source))?;
            self.bins.give(sock)?;
        }
        Ok(())
    }

    /// `initdb` into the data directory: trust authentication, user
    /// `postgres`, C locale, UTF-8.
    pub fn initdb(&self) -> Result<(), Error> {
        run(
            self.bins
                .command("initdb")
                .arg("-D")
                .arg(&self.layout.data)
                .args([
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--no-sync",
                    "--no-instructions",
                    "--locale=C",
                    "--encoding=UTF8",
                    "--wal-segsize=1",
                ])
                .current_dir(&self.layout.root),
            "initdb",
        )
        .map_err(|error| self.access_hint(error))?;
        Ok(())
    }

    /// A fresh data directory: a copy of the template (copies are ~6 times
    /// faster than `initdb`), or `initdb` when there is no template.
    pub fn init_from_template(&self) -> Result<(), Error> {
        match template(&self.bins) {
            Ok(template) => {
                let copied = run(
                    self.bins
                        .command_for("cp")
                        .arg("-R")
                        .arg("-p")
                        .arg(template)
                        .arg(&self.layout.data)
                        .current_dir(&self.layout.root),
                    "copying the template data directory",
                );
                match copied {
                    Ok(_) => Ok(()),
                    Err(error) => {
                        // A template damaged since (a temp cleaner): start afresh.
                        tracing::debug!(%error, "copying the template failed; running initdb");
                        let _ = std::fs::remove_dir_all(&self.layout.data);
                        self.initdb()
                    }
                }
            }
            Err(error) => {
                tracing::debug!(%error, "no template data directory; running initdb");
                self.initdb()
            }
        }
    }

    /// Adds a hint to a "Permission denied" from a tool run as the server
    /// user: it must be able to reach the kit's folder.
    fn access_hint(&self, error: Error) -> Error {
        let Some(user) = self.bins.server_user() else {
            return error;
        };
        let denied = match &error {
            Error::Command { output, .. } => output.contains("Permission denied"),
            Error::Io { source, .. } => source.kind() == std::io::ErrorKind::PermissionDenied,
            _ => false,
        };
        if denied {
            Error::Access {
                user: user.to_owned(),
                path: self.layout.root.clone(),
                detail: error.to_string(),
            }
        } else {
            error
        }
    }

    /// Writes the kit's settings (port, socket folder, test tuning) into
    /// `pgstack.conf` and includes it from `postgresql.conf`.
    pub fn write_settings(&self, port: u16) -> Result<(), Error> {
        let sock = match &self.layout.sock {
            Some(sock) => sock.display().to_string().replace('\'', "''"),
            None => String::new(),
        };
        let settings = format!(
            "# Written by the pgstack test kit; rewritten on every start.\n\
             listen_addresses = '127.0.0.1'\n\
             port = {port}\n\
             unix_socket_directories = '{sock}'\n\
             max_connections = 300\n\
             shared_buffers = 32MB\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             wal_level = replica\n\
             max_wal_senders = 10\n\
             max_replication_slots = 10\n\
             wal_keep_size = 256MB\n\
             max_wal_size = 256MB\n\
             hot_standby = on\n\
             wal_writer_delay = 10ms\n\
             wal_receiver_status_interval = 1s\n\
             wal_retrieve_retry_interval = 500ms\n\
             timezone = 'UTC'\n\
             log_timezone = 'UTC'\n\
             log_line_prefix = '%m [%p] %q%u@%d '\n\
             log_min_duration_statement = -1\n"
        );
        let file = self.layout.data.join(SETTINGS_FILE);
        std::fs::write(&file, settings)
            .map_err(|source| Error::io(format!("writing {}", file.display()), source))?;
        self.bins.give(&file)?;
        let main = self.layout.data.join("postgresql.conf");
        let text = std::fs::read_to_string(&main)
            .map_err(|source| Error::io(format!("reading {}", main.display()), source))?;
        let include = format!("include_if_exists = '{SETTINGS_FILE}'");
        if !text.lines().any(|line| line.trim() == include) {
            let mut text = text;
            text.push_str(&format!("\n# The pgstack test kit's settings\n{include}\n"));
            std::fs::write(&main, text)
                .map_err(|source| Error::io(format!("writing {}", main.display()), source))?;
        }
        Ok(())
    }

    /// The pid of a live postmaster on this data directory. A pid file left
    /// by a dead (or zombie) postmaster is removed.
    pub fn running_pid(&self) -> Option<i32> {
        running_pid(&self.layout.data)
    }

    /// Whether a postmaster runs on this data directory.
    pub fn is_running(&self) -> bool {
        self.running_pid().is_some()
    }

    fn log_len(&self) -> u64 {
        std::fs::metadata(&self.layout.log)
            .map(|meta| meta.len())
            .unwrap_or(0)
    }

    /// The log written since byte `from`.
    fn log_since(&self, from: u64) -> String {
        let mut text = String::new();
        if let Ok(mut file) = std::fs::File::open(&self.layout.log) {
            let _ = file.seek(SeekFrom::Start(from));
            let mut bytes = Vec::new();
            let _ = file.read_to_end(&mut bytes);
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
        text
    }

    /// The last `lines` lines of the server log.
    pub fn log_tail(&self, lines: usize) -> String {
        let len = self.log_len();
        tail(&self.log_since(len.saturating_sub(64 * 1024)), lines)
    }

    fn start_error(&self, reason: String, log_from: u64) -> Error {
        let mut log_tail = tail(&self.log_since(log_from), 30);
        if log_tail.trim().is_empty() {
            log_tail = self.log_tail(30);
        }
        Error::Start {
            data_dir: self.layout.data.clone(),
            log: self.layout.log.clone(),
            reason,
            log_tail,
        }
    }

    /// A killed postmaster leaves its socket lock file behind, naming a pid
    /// that may still exist as a zombie; no server runs here, so the files in
    /// our own socket folder are stale.
    fn remove_stale_socket_locks(&self) {
        let Some(sock) = &self.layout.sock else {
            return;
        };
        let Ok(entries) = std::fs::read_dir(sock) else {
            return;
        };
        for entry in entries.filter_map(Result::ok) {
            if entry.file_name().to_string_lossy().starts_with(".s.PGSQL.") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// `pg_ctl start -w`: returns once the server accepts connections.
    fn try_start(&self) -> Result<(), StartFailure> {
        if self.running_pid().is_none() {
            self.remove_stale_socket_locks();
        }
        let from = self.log_len();
        let result = self
            .bins
            .command("pg_ctl")
            .arg("start")
            .arg("-w")
            .arg("-t")
            .arg(START_TIMEOUT.as_secs().to_string())
            .arg("-s")
            .arg("-D")
            .arg(&self.layout.data)
            .arg("-l")
            .arg(&self.layout.log)
            .current_dir(&self.layout.root)
            .output();
        let output = match result {
            Ok(output) => output,
            Err(source) => {
                return Err(StartFailure::Other(Error::io(
                    "running pg_ctl start",
                    source,
                )));
            }
        };
        if output.status.success() {
            return Ok(());
        }
        let log = self.log_since(from);
        let mut reason = format!(
            "pg_ctl start exited with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
        if log.contains("Address already in use") {
            reason.push_str(" (port in use)");
            return Err(StartFailure::PortInUse(self.start_error(reason, from)));
        }
        if log.contains("pre-existing shared memory block") || log.contains("already exists") {
            reason.push_str(" (leftovers of a previous server)");
            return Err(StartFailure::Leftovers(self.start_error(reason, from)));
        }
        // A timed-out start may have left a server behind.
        if self.is_running() {
            let _ = self.stop_immediate();
        }
        Err(StartFailure::Other(self.start_error(reason, from)))
    }

    /// Starts the server on `port`, or on other free ports when `port` is
    /// taken and `may_move` is true. Returns the port it listens on.
    pub fn start(&self, port: u16, may_move: bool) -> Result<u16, Error> {
        let mut port = port;
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.write_settings(port)?;
            match self.try_start() {
                Ok(()) => return Ok(port),
                Err(StartFailure::PortInUse(error))
                    if attempt < if may_move { PORT_ATTEMPTS } else { 4 } =>
                {
                    tracing::debug!(port, attempt, "port taken, retrying");
                    if may_move {
                        port = free_port()?;
                    } else {
                        // Someone holds our port: give it a moment, then retry.
                        std::thread::sleep(Duration::from_millis(250));
                    }
                    drop(error);
                }
                Err(StartFailure::Leftovers(error)) if attempt < PORT_ATTEMPTS => {
                    tracing::debug!(%error, attempt, "leftovers of a previous server, retrying");
                    std::thread::sleep(Duration::from_millis(100 * attempt as u64));
                }
                Err(StartFailure::PortInUse(error))
                | Err(StartFailure::Leftovers(error))
                | Err(StartFailure::Other(error)) => {
                    return Err(error);
                }
            }
        }
    }

    /// `pg_ctl stop -m fast -w`; nothing to do when it is not running.
    pub fn stop_fast(&self) -> Result<(), Error> {
        if !self.is_running() {
            return Ok(());
        }
        let result = run(
            self.bins
                .command("pg_ctl")
                .arg("stop")
                .arg("-m")
                .arg("fast")
                .arg("-w")
                .arg("-t")
                .arg(STOP_TIMEOUT.as_secs().to_string())
                .arg("-s")
                .arg("-D")
                .arg(&self.layout.data)
                .current_dir(&self.layout.root),
            "pg_ctl stop",
        );
        match result {
            Ok(_) => Ok(()),
            // It went away by itself in the meantime.
            Err(_) if !self.is_running() => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// Waits until the postmaster `pid` has exited (or is a zombie) and its
    /// pid file is gone or stale.
    fn wait_gone(&self, pid: i32, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if proc_state(pid) != ProcState::Alive && !group_alive(pid) {
                let _ = self.running_pid();
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Immediate shutdown (SIGQUIT to the postmaster), then SIGKILL to its
    /// process group if it does not go within a few seconds. No signals, no
    /// child processes spawned: usable from `Drop`.
    pub fn stop_immediate(&self) -> Result<(), Error> {
        let Some(pid) = self.running_pid() else {
            return Ok(());
        };
        let target = nix::unistd::Pid::from_raw(pid);
        let _ = nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGQUIT);
        if self.wait_gone(pid, Duration::from_secs(5)) {
            return Ok(());
        }
        self.kill9()
    }

    /// SIGKILL to the postmaster and every process of its group (pg_ctl
    /// makes the postmaster a process-group leader), then waits until it is
    /// dead.
    pub fn kill9(&self) -> Result<(), Error> {
        let Some(pid) = self.running_pid() else {
            return Ok(());
        };
        let target = nix::unistd::Pid::from_raw(pid);
        if nix::sys::signal::killpg(target, nix::sys::signal::Signal::SIGKILL).is_err() {
            let _ = nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGKILL);
        }
        if self.wait_gone(pid, Duration::from_secs(10)) {
            Ok(())
        } else {
            Err(Error::Stop {
                data_dir: self.layout.data.clone(),
                log: self.layout.log.clone(),
                seconds: 10,
            })
        }
    }

    /// `pg_ctl promote -w`: a standby becomes a primary.
    pub fn promote(&self) -> Result<(), Error> {
        run(
            self.bins
                .command("pg_ctl")
                .arg("promote")
                .arg("-w")
                .arg("-s")
                .arg("-D")
                .arg(&self.layout.data)
                .current_dir(&self.layout.root),
            "pg_ctl promote",
        )?;
        Ok(())
    }

    /// `pg_basebackup -R -X stream` from the server on `primary_port` into
    /// this server's (not yet existing) data directory.
    pub fn base_backup_from(&self, primary_port: u16) -> Result<(), Error> {
        run(
            self.bins
                .command("pg_basebackup")
                .arg("-h")
                .arg("127.0.0.1")
                .arg("-p")
                .arg(primary_port.to_string())
                .args([
                    "-U",
                    "postgres",
                    "-R",
                    "-X",
                    "stream",
                    "-c",
                    "fast",
                    "--no-sync",
                ])
                .arg("-D")
                .arg(&self.layout.data)
                .current_dir(&self.layout.root),
            "pg_basebackup",
        )
        .map_err(|error| self.access_hint(error))?;
        Ok(())
    }

    /// Removes the whole root folder.
    pub fn remove_files(&self) -> Result<(), Error> {
        match std::fs::remove_dir_all(&self.layout.root) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(Error::io(
                format!("removing {}", self.layout.root.display()),
                source,
            )),
        }
    }
}

/// Bumped whenever the `initdb` options change, so old templates are not used.
const TEMPLATE_FORMAT: u32 = 1;

/// The template data directory copied for every cluster (one `initdb` instead
/// of one per cluster): shared by every test process of this user and
/// PostgreSQL version (kept in the temporary folder), or, when that cannot be
/// used, one of this process's own.
fn template(bins: &PgBinaries) -> Result<PathBuf, String> {
    static TEMPLATE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    TEMPLATE
        .get_or_init(|| {
            shared_template(bins)
                .or_else(|error| {
                    tracing::debug!(%error, "no shared template data directory; making one for this process");
                    process_template(bins)
                })
                .map_err(|error| error.to_string())
        })
        .clone()
}

/// Whether `dir` is a complete template made by the server user, writable
/// by nobody else.
fn usable_template(dir: &Path, uid: u32) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return false;
    };
    meta.is_dir()
        && meta.uid() == uid
        && meta.mode() & 0o022 == 0
        && dir.join("complete").is_file()
        && dir.join("data/PG_VERSION").is_file()
        && dir.join("data/global/pg_control").is_file()
        && dir.join("data/base/1/PG_VERSION").is_file()
}

fn shared_template(bins: &PgBinaries) -> Result<PathBuf, Error> {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let uid = bins.server_uid();
    let version = bins
        .version()
        .map_err(|error| Error::NotApplicable(error.to_string()))?;
    let mut hasher = DefaultHasher::new();
    bins.bindir().hash(&mut hasher);
    let dir = std::env::temp_dir().join(format!(
        "pgstack-kit-template-v{TEMPLATE_FORMAT}-{version}-{uid}-{:016x}",
        hasher.finish()
    ));
    if usable_template(&dir, uid) {
        return Ok(dir.join("data"));
    }
    // Build it aside, then rename it into place (atomic; if another process
    // got there first, its copy wins).
    let staging = tempfile::Builder::new()
        .prefix(".pgstack-kit-template-staging-")
        .tempdir()
        .map_err(|source| Error::io("creating a temporary folder", source))?
        .keep();
    let server = Server::new(bins.clone(), Layout::in_root(&staging));
    let built = server
        .prepare_root()
        .and_then(|()| crate::watchdog::spawn_watchdog(&server.layout, false).map(drop))
        .and_then(|()| server.initdb())
        .and_then(|()| {
            std::fs::write(staging.join("complete"), "")
                .map_err(|source| Error::io("marking the template complete", source))
        });
    if let Err(error) = built {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(error);
    }
    // An incomplete or damaged template of ours is replaced.
    {
        use std::os::unix::fs::MetadataExt;
        if let Ok(meta) = std::fs::symlink_metadata(&dir)
            && meta.is_dir()
            && meta.uid() == uid
            && !usable_template(&dir, uid)
        {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    if std::fs::rename(&staging, &dir).is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    if usable_template(&dir, uid) {
        Ok(dir.join("data"))
    } else {
        Err(Error::NotApplicable(format!(
            "{} is not a usable template (owner, permissions or contents)",
            dir.display()
        )))
    }
}

fn process_template(bins: &PgBinaries) -> Result<PathBuf, Error> {
    let root = tempfile::Builder::new()
        .prefix("pgstack-kit-template-")
        .tempdir()
        .map_err(|source| Error::io("creating a temporary folder", source))?
        .keep();
    let server = Server::new(bins.clone(), Layout::in_root(&root));
    server.prepare_root()?;
    // Removed by a watchdog once this process is gone.
    drop(crate::watchdog::spawn_watchdog(&server.layout, false)?);
    server.initdb()?;
    Ok(server.layout.data)
}

/// The pid of a live postmaster on the data directory `data`. A pid file left
/// by a dead (or zombie) postmaster is removed.
pub(crate) fn running_pid(data: &Path) -> Option<i32> {
    let file = data.join("postmaster.pid");
    let text = std::fs::read_to_string(&file).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    // After a reboot the pid may belong to some other program.
    let foreign = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|cmdline| !String::from_utf8_lossy(&cmdline).contains("postgres"))
        .unwrap_or(false);
    match proc_state(pid) {
        ProcState::Alive if !foreign => Some(pid),
        ProcState::Alive | ProcState::Zombie | ProcState::Gone => {
            tracing::debug!(pid, file = %file.display(), "removing a stale postmaster.pid");
            let _ = std::fs::remove_file(&file);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_taken_port_moves_the_server_to_another() {
        let taken = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = taken.local_addr().unwrap().port();
        let root = tempfile::Builder::new()
            .prefix("pgstack-kit-unit-")
            .tempdir()
            .unwrap()
            .keep();
        let server = Server::new(PgBinaries::find().unwrap(), Layout::in_root(&root));
        server.prepare_root().unwrap();
        server.init_from_template().unwrap();
        let started = server.start(port, true);
        let log = server.log_tail(50);
        let _ = server.stop_immediate();
        let _ = server.remove_files();
        let started = started.unwrap();
        assert_ne!(started, port);
        assert!(log.contains("Address already in use"), "{log}");
    }

    #[test]
    fn a_taken_port_fails_a_fixed_start_with_the_log() {
        let taken = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = taken.local_addr().unwrap().port();
        let root = tempfile::Builder::new()
            .prefix("pgstack-kit-unit-")
            .tempdir()
            .unwrap()
            .keep();
        let server = Server::new(PgBinaries::find().unwrap(), Layout::in_root(&root));
        server.prepare_root().unwrap();
        server.init_from_template().unwrap();
        let error = server.start(port, false).unwrap_err().to_string();
        let _ = server.remove_files();
        assert!(error.contains("port in use"), "{error}");
        assert!(error.contains("Address already in use"), "{error}");
        assert!(error.contains("server.log"), "{error}");
    }

    #[test]
    fn a_long_root_turns_unix_sockets_off() {
        let layout = Layout::in_root(Path::new("/tmp/x"));
        assert_eq!(layout.data, Path::new("/tmp/x/data"));
        assert!(layout.sock.is_some());
        let long = "/tmp/".to_owned() + &"d".repeat(100);
        assert!(Layout::in_root(Path::new(&long)).sock.is_none());
    }
}
