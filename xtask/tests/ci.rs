//! `cargo xtask ci`, run as the real binary with a stand-in for cargo that
//! records its calls: the steps of `.ci/run` in order, each printed, and the
//! first failure stops the run with exit code 1.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn explain(output: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A cargo that appends its arguments and working folder to `calls` and fails when its
/// first argument is `$FAIL_AT`.
fn fake_cargo(dir: &Path) -> PathBuf {
    let path = dir.join("cargo");
    std::fs::write(
        &path,
        r#"#!/bin/sh
echo "$(pwd) | $*" >> "$CALLS"
if [ "$1" = "$FAIL_AT" ]; then echo "fake $1 failure" >&2; exit 3; fi
echo "fake $1 ok"
"#,
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn ci(dir: &Path, fail_at: &str) -> (Output, Vec<String>) {
    let calls = dir.join("calls");
    let _ = std::fs::remove_file(&calls);
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("ci")
        .current_dir(dir)
        .env("CARGO", fake_cargo(dir))
        .env("CALLS", &calls)
        .env("FAIL_AT", fail_at)
        .output()
        .unwrap();
    let calls = std::fs::read_to_string(&calls)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect();
    (out, calls)
}

#[test]
fn runs_format_clippy_and_tests_in_order_from_the_workspace_root() {
    let dir = tempfile::tempdir().unwrap();
    let (out, calls) = ci(dir.path(), "none");
    assert!(out.status.success(), "{}", explain(&out));
    let root = root().canonicalize().unwrap();
    assert_eq!(
        calls,
        vec![
            format!("{} | fmt --all -- --check", root.display()),
            format!(
                "{} | clippy --workspace --all-targets -- -D warnings",
                root.display()
            ),
            format!("{} | test --workspace", root.display()),
        ]
    );
    let text = String::from_utf8_lossy(&out.stdout);
    for line in [
        "== [1/3] format: cargo fmt --all -- --check",
        "== [2/3] clippy: cargo clippy --workspace --all-targets -- -D warnings",
        "== [3/3] tests: cargo test --workspace",
        "fake test ok",
        "ci passed: format, clippy, tests",
    ] {
        assert!(text.contains(line), "{line:?} missing: {}", explain(&out));
    }
}

#[test]
fn the_first_failure_stops_the_run_with_exit_code_1() {
    let dir = tempfile::tempdir().unwrap();
    let (out, calls) = ci(dir.path(), "clippy");
    assert_eq!(out.status.code(), Some(1), "{}", explain(&out));
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(calls[1].ends_with("| clippy --workspace --all-targets -- -D warnings"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("fake clippy failure"), "{}", explain(&out));
    assert!(
        err.contains("ci failed at step 2 of 3 (clippy)"),
        "{}",
        explain(&out)
    );
    assert!(
        err.contains("the later steps did not run"),
        "{}",
        explain(&out)
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("[3/3]"),
        "{}",
        explain(&out)
    );

    let (out, calls) = ci(dir.path(), "fmt");
    assert_eq!(out.status.code(), Some(1), "{}", explain(&out));
    assert_eq!(calls.len(), 1, "{calls:?}");
}

#[test]
fn usage_errors_exit_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["ci", "--everything"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", explain(&out));
}
