//! `cargo xtask verify` runs as a test, so `cargo test` enforces the architecture rules.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn verify(root: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["verify", "--no-deny", "--root"])
        .arg(root)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Copies the workspace's sources (not target/ or .git/) to `to`.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        if name == "target" || name == ".git" {
            continue;
        }
        let (src, dst) = (entry.path(), to.join(&name));
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&src, &dst);
        } else {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}

#[test]
fn the_workspace_keeps_every_architecture_rule() {
    let (ok, text) = verify(&root());
    assert!(ok, "cargo xtask verify failed:\n{text}");
    assert!(text.contains("all architecture rules hold"), "{text}");
}

#[test]
fn a_forbidden_edge_is_named_precisely() {
    let copy = tempfile::tempdir().unwrap();
    copy_tree(&root(), copy.path());

    // The test kit's library must not depend on any pgstack crate of the stack.
    let manifest = copy.path().join("tests/Cargo.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let edited = text.replacen(
        "[dependencies]\n",
        "[dependencies]\npgstack-config = { path = \"../crates/config\" }\n",
        1,
    );
    assert_ne!(
        text, edited,
        "tests/Cargo.toml has no [dependencies] table to edit"
    );
    std::fs::write(&manifest, edited).unwrap();

    let (ok, text) = verify(copy.path());
    assert!(!ok, "verify passed with a forbidden edge:\n{text}");
    assert!(
        text.contains(
            "[layering] tests/Cargo.toml: forbidden dependency `pgstack-tests` -> `pgstack-config`; `pgstack-tests` may depend only on: pgstack-localpg"
        ),
        "{text}"
    );
}

#[test]
fn the_test_kit_as_a_normal_dependency_is_refused() {
    let copy = tempfile::tempdir().unwrap();
    copy_tree(&root(), copy.path());

    // The test kit is a dev-dependency everywhere but in xtask.
    let manifest = copy.path().join("crates/migrations/Cargo.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let edited = text.replacen(
        "[dependencies]\n",
        "[dependencies]\npgstack-tests = { path = \"../../tests\" }\n",
        1,
    );
    assert_ne!(
        text, edited,
        "crates/migrations/Cargo.toml has no [dependencies] table"
    );
    std::fs::write(&manifest, edited).unwrap();

    let (ok, text) = verify(copy.path());
    assert!(
        !ok,
        "verify passed with the test kit as a normal dependency:\n{text}"
    );
    assert!(
        text.contains("[test-kit-dev-only] crates/migrations/Cargo.toml: `pgstack-migrations` depends on pgstack-tests as a normal dependency"),
        "{text}"
    );
}

#[test]
fn the_local_server_crate_stays_a_leaf() {
    let copy = tempfile::tempdir().unwrap();
    copy_tree(&root(), copy.path());

    // pgstack-localpg is shared by the test kit and the CLI: it may use no pgstack crate.
    let manifest = copy.path().join("crates/localpg/Cargo.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let edited = text.replacen(
        "[dependencies]\n",
        "[dependencies]\npgstack-config = { path = \"../config\" }\n",
        1,
    );
    assert_ne!(
        text, edited,
        "crates/localpg/Cargo.toml has no [dependencies] table"
    );
    std::fs::write(&manifest, edited).unwrap();

    let (ok, text) = verify(copy.path());
    assert!(
        !ok,
        "verify passed with pgstack-localpg depending on the stack:\n{text}"
    );
    assert!(
        text.contains(
            "[layering] crates/localpg/Cargo.toml: forbidden dependency `pgstack-localpg` -> `pgstack-config`; `pgstack-localpg` may depend only on: no pgstack crate"
        ),
        "{text}"
    );
}

#[test]
fn the_cli_may_use_the_test_kit_only_in_its_tests() {
    let copy = tempfile::tempdir().unwrap();
    copy_tree(&root(), copy.path());

    // pgstack-cli gets its development server from pgstack-localpg, never from the kit.
    let manifest = copy.path().join("crates/cli/Cargo.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let edited = text.replacen(
        "[dependencies]\n",
        "[dependencies]\npgstack-tests = { path = \"../../tests\" }\n",
        1,
    );
    assert_ne!(
        text, edited,
        "crates/cli/Cargo.toml has no [dependencies] table"
    );
    std::fs::write(&manifest, edited).unwrap();

    let (ok, text) = verify(copy.path());
    assert!(
        !ok,
        "verify passed with the kit as a normal dependency of the CLI:\n{text}"
    );
    assert!(
        text.contains("[test-kit-dev-only] crates/cli/Cargo.toml: `pgstack-cli` depends on pgstack-tests as a normal dependency"),
        "{text}"
    );
}
