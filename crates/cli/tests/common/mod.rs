//! What the test files of the `pgstack` binary share: the binary with a clean environment, and
//! readable assertions on its output.

#![allow(dead_code, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// The workspace root (its `migrations/` is the reference schema these tests use).
pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .unwrap()
        .to_path_buf()
}

/// The binary, run from the workspace root with a clean environment: no database,
/// environment, pgstack or libpq variables of the caller.
pub(crate) fn pgstack(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgstack"));
    cmd.args(args).current_dir(root());
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if key.starts_with("DB_") || key.starts_with("PGSTACK_") || key.starts_with("PG") {
            cmd.env_remove(key);
        }
    }
    for var in ["DATABASE_URL", "DATABASE_REPLICA_URLS", "APP_ENV"] {
        cmd.env_remove(var);
    }
    cmd
}

/// Status, stdout and stderr, for assertion messages.
pub(crate) fn explain(output: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

pub(crate) fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub(crate) fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Runs the command and expects success.
pub(crate) fn ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", explain(&out));
    out
}

/// Runs the command and expects exit code `code`.
pub(crate) fn fails(cmd: &mut Command, code: i32) -> Output {
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(code), "{}", explain(&out));
    out
}

/// The command's stdout as JSON, whatever its exit code.
pub(crate) fn json(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", explain(output)))
}

/// Runs the command, expects success, and parses its stdout as JSON.
pub(crate) fn json_of(cmd: &mut Command) -> Value {
    json(&ok(cmd))
}

/// `url` with `password` added to its user part (the kit's servers trust every login, so the
/// password is accepted and ignored: tests use it to prove it never shows).
pub(crate) fn with_password(url: &str, password: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (user, host) = rest.split_once('@').unwrap();
    assert!(!user.contains(':'), "the kit's URL already has a password");
    format!("{scheme}://{user}:{password}@{host}")
}

/// A development-cluster folder of a test's own (`PGSTACK_DEV_DIR`), whose server is stopped
/// and files deleted however the test ends.
pub(crate) struct DevDir {
    _parent: tempfile::TempDir,
    dir: PathBuf,
}

impl DevDir {
    pub(crate) fn new(prefix: &str) -> DevDir {
        use std::os::unix::fs::PermissionsExt as _;
        let parent = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
        // As root the server runs as `postgres`, which must be able to enter the folder.
        std::fs::set_permissions(parent.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let dir = parent.path().join("dev");
        DevDir {
            _parent: parent,
            dir,
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for DevDir {
    fn drop(&mut self) {
        let _ = pgstack(&["db-down", "--purge"])
            .env("PGSTACK_DEV_DIR", &self.dir)
            .output();
    }
}
