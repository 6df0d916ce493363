//! `pgstack db-up`, `db-status`, `db-down`, run as the real binary against a
//! development server in a folder of its own (`PGSTACK_DEV_DIR`), so a
//! developer's `target/pgstack-dev` is never touched.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A dev folder that is stopped and deleted however the test ends.
struct DevDir {
    _parent: tempfile::TempDir,
    dir: PathBuf,
}

impl DevDir {
    fn new() -> DevDir {
        let parent = tempfile::Builder::new()
            .prefix("pgstack-cli-db-")
            .tempdir()
            .unwrap();
        // As root the server runs as `postgres`, which must be able to enter it.
        std::fs::set_permissions(parent.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let dir = parent.path().join("dev");
        DevDir {
            _parent: parent,
            dir,
        }
    }

    fn pgstack(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_pgstack"))
            .args(args)
            .env("PGSTACK_DEV_DIR", &self.dir)
            .env_remove("DATABASE_URL")
            .output()
            .unwrap()
    }
}

impl Drop for DevDir {
    fn drop(&mut self) {
        let _ = self.pgstack(&["db-down", "--purge"]);
    }
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn explain(output: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        stdout(output),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn exported_url(text: &str) -> String {
    text.lines()
        .find_map(|line| line.strip_prefix("export DATABASE_URL="))
        .unwrap_or_else(|| panic!("no export line in:\n{text}"))
        .trim()
        .to_owned()
}

fn query_database(url: &str) -> String {
    let url = url.to_owned();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async move {
            let client = pgstack_tests::connect_url(&url).await.unwrap();
            client
                .query_one("SELECT current_database()::text", &[])
                .await
                .unwrap()
                .get(0)
        })
}

fn postmaster_pid(data: &Path) -> Option<String> {
    std::fs::read_to_string(data.join("postmaster.pid"))
        .ok()
        .and_then(|text| text.lines().next().map(str::to_owned))
}

#[test]
fn db_up_status_down_round_trip() {
    let dev = DevDir::new();

    // Before anything exists.
    let status = dev.pgstack(&["db-status", "--json"]);
    assert!(status.status.success(), "{}", explain(&status));
    let json: serde_json::Value = serde_json::from_str(&stdout(&status)).unwrap();
    assert_eq!(json["running"], false);
    assert_eq!(json["initialized"], false);

    // Up: creates, starts, prints the URL of pgstack_dev.
    let up = dev.pgstack(&["db-up"]);
    assert!(up.status.success(), "{}", explain(&up));
    let text = stdout(&up);
    assert!(text.contains("Started"), "{text}");
    let url = exported_url(&text);
    assert!(
        url.starts_with("postgres://postgres@127.0.0.1:") && url.ends_with("/pgstack_dev"),
        "{url}"
    );
    assert_eq!(query_database(&url), "pgstack_dev");
    assert!(dev.dir.join("data").join("PG_VERSION").is_file());
    assert!(dev.dir.join("server.log").is_file());
    let state = std::fs::read_to_string(dev.dir.join("state")).unwrap();
    let port = url
        .trim_start_matches("postgres://postgres@127.0.0.1:")
        .trim_end_matches("/pgstack_dev");
    assert!(state.contains(&format!("port={port}")), "{state}");
    let pid = postmaster_pid(&dev.dir.join("data")).expect("running");

    // Up again: idempotent, same URL, same server.
    let again = dev.pgstack(&["db-up"]);
    assert!(again.status.success(), "{}", explain(&again));
    assert!(
        stdout(&again).contains("already running"),
        "{}",
        stdout(&again)
    );
    assert_eq!(exported_url(&stdout(&again)), url);
    assert_eq!(
        postmaster_pid(&dev.dir.join("data")).as_deref(),
        Some(pid.as_str())
    );

    // Status: human and JSON.
    let human = dev.pgstack(&["db-status"]);
    assert!(human.status.success(), "{}", explain(&human));
    let text = stdout(&human);
    assert!(text.contains("is running"), "{text}");
    assert!(text.contains(&url), "{text}");
    assert!(
        text.contains(&dev.dir.join("data").display().to_string()),
        "{text}"
    );
    let json = dev.pgstack(&["db-status", "--json"]);
    let json: serde_json::Value = serde_json::from_str(&stdout(&json)).unwrap();
    assert_eq!(json["running"], true);
    assert_eq!(json["url"], url.as_str());
    assert_eq!(json["port"].as_u64().unwrap().to_string(), port);
    assert!(
        json["server_version"]
            .as_str()
            .unwrap()
            .starts_with(|c: char| c.is_ascii_digit()),
        "{json}"
    );

    // Down, and down again.
    let down = dev.pgstack(&["db-down"]);
    assert!(down.status.success(), "{}", explain(&down));
    assert!(stdout(&down).contains("Stopped"), "{}", stdout(&down));
    assert!(postmaster_pid(&dev.dir.join("data")).is_none());
    let down = dev.pgstack(&["db-down"]);
    assert!(down.status.success(), "{}", explain(&down));
    assert!(stdout(&down).contains("not running"), "{}", stdout(&down));
    let json = dev.pgstack(&["db-status", "--json"]);
    let json: serde_json::Value = serde_json::from_str(&stdout(&json)).unwrap();
    assert_eq!(json["running"], false);
    assert_eq!(json["initialized"], true);

    // Up after down: the data persisted, the port is reused.
    let up = dev.pgstack(&["db-up"]);
    assert!(up.status.success(), "{}", explain(&up));
    assert!(stdout(&up).contains("Started"), "{}", stdout(&up));
    assert_eq!(exported_url(&stdout(&up)), url);
    assert_eq!(query_database(&url), "pgstack_dev");

    // Purge: stops it and deletes the folder.
    let purge = dev.pgstack(&["db-down", "--purge"]);
    assert!(purge.status.success(), "{}", explain(&purge));
    assert!(!dev.dir.exists());
}
