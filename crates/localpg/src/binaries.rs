//! Finding the PostgreSQL server binaries and the user to run them as.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::error::Error;

/// The folder holding `initdb`, `pg_ctl`, `postgres`, `pg_basebackup`, ... and
/// the user the server runs as.
///
/// Looked up in this order: `PGSTACK_PG_BINDIR`; the folder of `initdb` found on
/// `PATH` (symbolic links followed, so `/usr/local/bin/initdb ->
/// /usr/lib/postgresql/15/bin/initdb` yields the full Debian folder);
/// `pg_config --bindir`; the newest `/usr/lib/postgresql/*/bin`.
///
/// PostgreSQL refuses to run as root. When the process runs as root, every
/// tool runs as the `postgres` user (or `PGSTACK_PG_USER`) through
/// [`std::os::unix::process::CommandExt::uid`]/`gid`, and the kit hands the
/// folders it creates to that user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgBinaries {
    bindir: PathBuf,
    user: Option<ServerUser>,
}

/// The unprivileged user the server runs as when the process runs as root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ServerUser {
    pub(crate) name: String,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
}

const REQUIRED: [&str; 3] = ["initdb", "pg_ctl", "postgres"];

fn has_server_binaries(dir: &Path) -> bool {
    REQUIRED.iter().all(|tool| dir.join(tool).is_file())
}

/// Parses "15", "9.6", "16.2" into something sortable.
fn version_key(name: &OsStr) -> Vec<u64> {
    name.to_string_lossy()
        .split('.')
        .map(|part| part.parse::<u64>().unwrap_or(0))
        .collect()
}

impl PgBinaries {
    /// Finds the server binaries (see the type's documentation for the order)
    /// and, when running as root, the user to run them as.
    ///
    /// # Errors
    /// [`Error::NoBinaries`] when no folder holds them; [`Error::NoServerUser`]
    /// when running as root without a user to run the server as.
    pub fn find() -> Result<PgBinaries, Error> {
        let bindir = find_bindir()?;
        let user = server_user()?;
        Ok(PgBinaries { bindir, user })
    }

    /// Uses the binaries in `bindir` (still picking the server user when root).
    ///
    /// # Errors
    /// [`Error::NoBinaries`] when `bindir` lacks `initdb`, `pg_ctl` or `postgres`.
    pub fn in_dir(bindir: impl Into<PathBuf>) -> Result<PgBinaries, Error> {
        let bindir = bindir.into();
        if !has_server_binaries(&bindir) {
            return Err(Error::NoBinaries {
                searched: bindir.display().to_string(),
            });
        }
        Ok(PgBinaries {
            bindir,
            user: server_user()?,
        })
    }

    /// The folder holding the binaries.
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// The full path of one tool (`"pg_dump"`, `"psql"`, ...).
    pub fn tool(&self, name: &str) -> PathBuf {
        self.bindir.join(name)
    }

    /// The name of the OS user the server runs as, when it differs from the
    /// current one (the process runs as root).
    pub fn server_user(&self) -> Option<&str> {
        self.user.as_ref().map(|user| user.name.as_str())
    }

    /// The uid the server runs as (the server user's, else the process's).
    pub(crate) fn server_uid(&self) -> u32 {
        match &self.user {
            Some(user) => user.uid,
            None => nix::unistd::geteuid().as_raw(),
        }
    }

    /// The version printed by `postgres --version`, e.g. `"15.8"`.
    ///
    /// # Errors
    /// When `postgres --version` cannot be run or fails.
    pub fn version(&self) -> Result<String, Error> {
        let output = run(
            self.command("postgres").arg("--version"),
            "postgres --version",
        )?;
        let text = String::from_utf8_lossy(&output.stdout);
        // "postgres (PostgreSQL) 15.8 (Debian 15.8-0+deb12u1)"
        let version = text
            .split_whitespace()
            .find(|word| word.chars().next().is_some_and(|c| c.is_ascii_digit()))
            .unwrap_or("unknown")
            .to_owned();
        Ok(version)
    }

    /// The major version (`15`), from `postgres --version`.
    ///
    /// # Errors
    /// As [`PgBinaries::version`].
    pub fn major_version(&self) -> Result<u32, Error> {
        let version = self.version()?;
        Ok(version
            .split('.')
            .next()
            .and_then(|major| major.parse().ok())
            .unwrap_or(0))
    }

    /// A command for one tool, run as the server user, with the `PG*`
    /// environment variables of the caller removed, standard input closed and
    /// the working directory set to `/` (which every user may enter).
    pub fn command(&self, tool: &str) -> Command {
        self.command_for(self.tool(tool))
    }

    /// Like [`PgBinaries::command`], for any program (`cp`, `sh`, ...).
    pub(crate) fn command_for(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new(program);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                command.env_remove(key);
            }
        }
        command
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .current_dir("/");
        if let Some(user) = &self.user {
            use std::os::unix::process::CommandExt;
            command.uid(user.uid).gid(user.gid);
            command.env("HOME", "/tmp").env("USER", &user.name);
        }
        command
    }

    /// Hands `path` (not recursively) to the server user, when there is one.
    pub(crate) fn give(&self, path: &Path) -> Result<(), Error> {
        if let Some(user) = &self.user {
            nix::unistd::chown(
                path,
                Some(nix::unistd::Uid::from_raw(user.uid)),
                Some(nix::unistd::Gid::from_raw(user.gid)),
            )
            .map_err(|errno| {
                Error::io(
                    format!("giving {} to user {}", path.display(), user.name),
                    std::io::Error::from(errno),
                )
            })?;
        }
        Ok(())
    }
}

fn find_bindir() -> Result<PathBuf, Error> {
    let mut searched = Vec::new();
    if let Some(dir) = std::env::var_os("PGSTACK_PG_BINDIR") {
        let dir = PathBuf::from(dir);
        if has_server_binaries(&dir) {
            return Ok(dir);
        }
        searched.push(format!("PGSTACK_PG_BINDIR={}", dir.display()));
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let initdb = dir.join("initdb");
            if initdb.is_file() {
                if let Ok(real) = std::fs::canonicalize(&initdb)
                    && let Some(real_dir) = real.parent()
                    && has_server_binaries(real_dir)
                {
                    return Ok(real_dir.to_path_buf());
                }
                if has_server_binaries(&dir) {
                    return Ok(dir);
                }
            }
        }
        searched.push("PATH".to_owned());
    }
    if let Ok(output) = Command::new("pg_config")
        .arg("--bindir")
        .stdin(Stdio::null())
        .output()
        && output.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if has_server_binaries(&dir) {
            return Ok(dir);
        }
    }
    searched.push("pg_config --bindir".to_owned());
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<_> = entries
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|path| has_server_binaries(&path.join("bin")))
            .collect();
        versions.sort_by_key(|path| path.file_name().map(version_key));
        if let Some(newest) = versions.pop() {
            return Ok(newest.join("bin"));
        }
    }
    searched.push("/usr/lib/postgresql/*/bin".to_owned());
    Err(Error::NoBinaries {
        searched: searched.join(", "),
    })
}

fn server_user() -> Result<Option<ServerUser>, Error> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    let name = std::env::var("PGSTACK_PG_USER").unwrap_or_else(|_| "postgres".to_owned());
    match nix::unistd::User::from_name(&name) {
        Ok(Some(user)) if !user.uid.is_root() => Ok(Some(ServerUser {
            name,
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
        })),
        _ => Err(Error::NoServerUser { user: name }),
    }
}

/// Runs a command to completion; a non-zero exit becomes [`Error::Command`]
/// with the end of what it printed.
pub(crate) fn run(command: &mut Command, what: &str) -> Result<Output, Error> {
    let output = command
        .output()
        .map_err(|source| Error::io(format!("running {what}"), source))?;
    if output.status.success() {
        Ok(output)
    } else {
        let mut text = String::from_utf8_lossy(&output.stderr).into_owned();
        text.push_str(&String::from_utf8_lossy(&output.stdout));
        Err(Error::Command {
            what: what.to_owned(),
            status: output.status.to_string(),
            output: tail(&text, 20),
        })
    }
}

/// The last `lines` lines of `text`.
pub(crate) fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    all[start..].join("\n")
}
