//! `pgstack config`, run as the real binary with a clean environment, a
//! temp `pgstack.toml`, and variables set on the command.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

const SECRET: &str = "s3cret-Xy7";

/// Runs `pgstack config <args>` in `dir` with only `vars` in its environment.
fn pgstack_config(dir: &Path, args: &[&str], vars: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_pgstack"));
    command
        .arg("config")
        .args(args)
        .current_dir(dir)
        .env_clear();
    for (name, value) in vars {
        command.env(name, value);
    }
    command.output().unwrap()
}

fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8(output.stdout.clone()).unwrap(),
        String::from_utf8(output.stderr.clone()).unwrap(),
    )
}

/// The row of `key` in the table.
fn row<'a>(table: &'a str, key: &str) -> &'a str {
    table
        .lines()
        .find(|line| line.split_whitespace().next() == Some(key))
        .unwrap_or_else(|| panic!("no row for {key} in:\n{table}"))
}

#[test]
fn prints_every_key_with_its_value_and_source() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("pgstack.toml"),
        "[default]\npool.max_size = 20\n\n[staging]\nquery.application_name = \"bills\"\n",
    )
    .unwrap();
    let output = pgstack_config(
        dir.path(),
        &[],
        &[
            ("APP_ENV", "staging"),
            (
                "DATABASE_URL",
                &format!("postgres://app:{SECRET}@db.internal:6432/bills"),
            ),
            ("PGSTACK_RETRY__INITIAL_BACKOFF", "250ms"),
        ],
    );
    let (stdout, stderr) = text(&output);
    assert_eq!(
        output.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        row(&stdout, "environment").ends_with("env APP_ENV"),
        "{stdout}"
    );
    assert!(
        row(&stdout, "pool.max_size").ends_with("pgstack.toml:2"),
        "{stdout}"
    );
    assert!(
        row(&stdout, "query.application_name").contains("bills"),
        "{stdout}"
    );
    assert!(
        row(&stdout, "query.application_name").ends_with("pgstack.toml:5"),
        "{stdout}"
    );
    assert!(
        row(&stdout, "pool.min_idle").ends_with("profile staging"),
        "{stdout}"
    );
    assert!(
        row(&stdout, "retry.max_attempts").ends_with("default"),
        "{stdout}"
    );
    let backoff = row(&stdout, "retry.initial_backoff");
    assert!(backoff.contains("250ms") && backoff.ends_with("env PGSTACK_RETRY__INITIAL_BACKOFF"));
    assert!(
        row(&stdout, "primary.host").contains("db.internal"),
        "{stdout}"
    );
    assert!(
        row(&stdout, "primary.password").contains("********"),
        "{stdout}"
    );
    assert!(
        row(&stdout, "primary.password").ends_with("env DATABASE_URL"),
        "{stdout}"
    );
    assert!(!stdout.contains(SECRET) && !stderr.contains(SECRET));
}

#[test]
fn json_output_has_each_key_value_and_source() {
    let dir = tempfile::tempdir().unwrap();
    let output = pgstack_config(
        dir.path(),
        &["--json", "--env", "production"],
        &[
            ("DB_PASSWORD", SECRET),
            ("DB_SSLMODE", "verify-full"),
            ("PGSTACK_POOL__MAX_SIZE", "80"),
        ],
    );
    let (stdout, stderr) = text(&output);
    assert_eq!(
        output.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(!stdout.contains(SECRET));
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["environment"], "production");
    let entry = |key: &str| {
        json["entries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["key"] == key)
            .unwrap_or_else(|| panic!("no entry {key}"))
            .clone()
    };
    assert_eq!(entry("pool.max_size")["value"], 80);
    assert_eq!(
        entry("pool.max_size")["source"],
        "env PGSTACK_POOL__MAX_SIZE"
    );
    assert_eq!(entry("environment")["source"], "code");
    assert_eq!(entry("pool.min_idle")["source"], "profile production");
    assert_eq!(entry("tls.mode")["value"], "verify-full");
    assert_eq!(entry("primary.password")["value"], "********");
    assert_eq!(entry("primary.password")["source"], "env DB_PASSWORD");
}

#[test]
fn the_file_flag_names_the_file_and_it_must_exist() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("elsewhere.toml");
    std::fs::write(&path, "[default]\n# a comment\nhealth.interval = \"7s\"\n").unwrap();
    let output = pgstack_config(dir.path(), &["--file", path.to_str().unwrap()], &[]);
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(
        row(&stdout, "health.interval").ends_with("elsewhere.toml:3"),
        "{stdout}"
    );

    let output = pgstack_config(dir.path(), &["--file", "missing.toml"], &[]);
    let (_, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr.contains("config file = missing.toml (code): no such file"),
        "{stderr}"
    );
}

#[test]
fn invalid_input_prints_every_problem_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("pgstack.toml"),
        "[default]\npool.min_idle = 40\npool.max_szie = 3\n\n[production]\ntls.mode = \"prefer\"\n",
    )
    .unwrap();
    let output = pgstack_config(
        dir.path(),
        &[],
        &[
            ("APP_ENV", "production"),
            ("PGSTACK_RETRY__MULTIPLIER", "0.5"),
            ("PGSTACK_POOL__MAX_SIZE", "30"),
            // A bad URL holding a password: reported, never echoed.
            (
                "DATABASE_REPLICA_URLS",
                &format!("postgres://app:{SECRET}@:notaport/bills"),
            ),
        ],
    );
    let (stdout, stderr) = text(&output);
    assert_eq!(
        output.status.code(),
        Some(1),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stderr.contains("invalid configuration: 5 problems"),
        "{stderr}"
    );
    for expected in [
        "pool.min_idle = 40 (pgstack.toml:2)",
        "pool.max_szie = 3 (pgstack.toml:3): unknown key; did you mean pool.max_size?",
        "tls.mode = prefer (pgstack.toml:6)",
        "retry.multiplier = 0.5 (env PGSTACK_RETRY__MULTIPLIER)",
        "replicas[0] (env DATABASE_REPLICA_URLS)",
    ] {
        assert!(
            stderr.contains(expected),
            "{expected:?} missing from:\n{stderr}"
        );
    }
    assert!(
        !stdout.contains(SECRET) && !stderr.contains(SECRET),
        "{stderr}"
    );
}

#[test]
fn invalid_input_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let output = pgstack_config(
        dir.path(),
        &["--json"],
        &[
            (
                "DATABASE_URL",
                &format!("postgres://app:{SECRET}@db:port/x"),
            ),
            ("APP_ENV", "prod"),
        ],
    );
    let (stdout, _) = text(&output);
    assert_eq!(output.status.code(), Some(1));
    assert!(!stdout.contains(SECRET), "{stdout}");
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(json["valid"], false);
    let problems = json["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 2, "{stdout}");
    assert_eq!(problems[0]["key"], "environment");
    assert_eq!(problems[0]["source"], "env APP_ENV");
    assert_eq!(problems[1]["key"], "primary");
    assert_eq!(problems[1]["source"], "env DATABASE_URL");
    assert_eq!(problems[1]["value"], serde_json::Value::Null);
}

#[test]
fn an_unknown_env_flag_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let output = pgstack_config(dir.path(), &["--env", "qa"], &[]);
    let (_, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr.contains("development, test, staging, production"),
        "{stderr}"
    );
}
