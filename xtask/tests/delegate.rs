//! `cargo xtask` runs pgstack-cli's operator commands on this workspace: the
//! same commands, options and output as `pgstack`, with messages that say
//! `cargo xtask` and the development server and backups under the
//! workspace's target folder (`CARGO_TARGET_DIR` when set, as before).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use pgstack_tests::TestDb;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The binary with none of the caller's database or pgstack variables.
fn xtask(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xtask"));
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

fn explain(output: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn help_lists_the_operator_commands_beside_its_own() {
    let out = xtask(&["--help"]).output().unwrap();
    assert!(out.status.success(), "{}", explain(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    for command in [
        "db-up",
        "db-down",
        "db-status",
        "db-reset",
        "migrate",
        "health",
        "backup",
        "restore",
        "config",
        "ci",
        "verify",
        "soak",
        "bench",
    ] {
        assert!(
            text.lines()
                .any(|l| l.trim_start().starts_with(&format!("{command} "))),
            "`{command}` missing from:\n{text}"
        );
    }
}

#[test]
fn messages_name_cargo_xtask() {
    let dir = tempfile::tempdir().unwrap();
    let out = xtask(&["db-status"])
        .env("PGSTACK_DEV_DIR", dir.path().join("dev"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", explain(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("run `cargo xtask db-up`"), "{text}");
}

#[tokio::test]
async fn db_reset_migrates_the_reference_schema() {
    let db = TestDb::new().await.unwrap();
    let out = xtask(&["db-reset", "--json", "--database-url", db.url()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", explain(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let migrations = std::fs::read_dir(root().join("migrations"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".up.sql")
        })
        .count();
    assert_eq!(
        json["applied"].as_array().unwrap().len(),
        migrations,
        "{json}"
    );
    let client = db.client().await.unwrap();
    let bills: bool = client
        .query_one("SELECT to_regclass('bills') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(bills);
}

#[tokio::test]
async fn backups_go_under_cargo_target_dir_as_before() {
    let db = TestDb::new().await.unwrap();
    let target = tempfile::tempdir().unwrap();
    let out = xtask(&["backup", "--database-url", db.url()])
        .env("CARGO_TARGET_DIR", target.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", explain(&out));
    let files = std::fs::read_dir(target.path().join("backups"))
        .unwrap()
        .count();
    assert_eq!(files, 1, "{}", explain(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("cargo xtask restore"),
        "{}",
        explain(&out)
    );
}
