//! The cleanup watchdog: removes a server when the process that owns it dies
//! without cleaning up.

use std::process::{Child, Command, Stdio};

use crate::error::Error;
use crate::server::Layout;

/// Starts a detached shell that waits for this process to end, then stops the
/// server in `layout` (immediate shutdown) and, unless `keep`, removes
/// `layout.root`.
///
/// Kill the returned child (and wait for it) once the server has been cleaned
/// up normally; until then it watches. It runs in its own process group, so a
/// signal to the caller's group (Ctrl-C, a test runner's timeout) does not
/// take it along.
///
/// # Errors
/// When `/bin/sh` cannot be started.
pub fn spawn_watchdog(layout: &Layout, keep: bool) -> Result<Child, Error> {
    use std::os::unix::process::CommandExt;
    const SCRIPT: &str = r#"
while kill -0 "$1" 2>/dev/null; do sleep 1; done
if [ -f "$3/postmaster.pid" ]; then
  p=$(head -n 1 "$3/postmaster.pid")
  if [ -n "$p" ]; then
    kill -QUIT "$p" 2>/dev/null
    i=0
    while [ "$i" -lt 20 ] && [ -f "$3/postmaster.pid" ]; do sleep 0.25; i=$((i + 1)); done
    if [ -f "$3/postmaster.pid" ]; then kill -KILL "$p" 2>/dev/null; fi
  fi
fi
if [ "$4" != keep ]; then rm -rf "$2"; fi
"#;
    Command::new("/bin/sh")
        .arg("-c")
        .arg(SCRIPT)
        .arg("pgstack-kit-watchdog")
        .arg(std::process::id().to_string())
        .arg(&layout.root)
        .arg(&layout.data)
        .arg(if keep { "keep" } else { "remove" })
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .current_dir("/")
        // Its own process group: a signal to the caller's group (Ctrl-C, a test
        // runner's timeout) must not take the watchdog with it.
        .process_group(0)
        .spawn()
        .map_err(|source| Error::io("starting the cleanup watchdog (/bin/sh)", source))
}
