//! The `pgstack` binary in a service's folder that is not this workspace: a
//! temporary folder with its own `pgstack.toml` and `migrations/` (two
//! migrations of its own), pointed at a kit server. db-reset, migrate, health,
//! config and doctor all work on that folder's schema only.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::Command;

use pgstack_tests::TestCluster;
use serde_json::Value;

/// A service folder: `pgstack.toml` naming `database` on `cluster`,
/// `migrations/` with accounts (1) and entries (2), and an empty `src/`.
struct Service {
    dir: tempfile::TempDir,
}

impl Service {
    fn new(cluster: &TestCluster, database: &str) -> Service {
        let dir = tempfile::Builder::new()
            .prefix("pgstack-service-")
            .tempdir()
            .unwrap();
        let root = dir.path();
        std::fs::write(
            root.join("pgstack.toml"),
            format!(
                "[default]\nprimary = \"{}\"\nquery.application_name = \"ledger\"\n",
                cluster.url(database)
            ),
        )
        .unwrap();
        let migrations = root.join("migrations");
        std::fs::create_dir_all(&migrations).unwrap();
        std::fs::create_dir_all(root.join("src")).unwrap();
        let write = |name: &str, sql: &str| std::fs::write(migrations.join(name), sql).unwrap();
        write(
            "0001_accounts.up.sql",
            "CREATE TABLE accounts (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name text NOT NULL UNIQUE);\n",
        );
        write("0001_accounts.down.sql", "DROP TABLE accounts;\n");
        // A foreign key without an index on its column: `doctor` finds it.
        write(
            "0002_entries.up.sql",
            "CREATE TABLE entries (\n  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,\n  \
             account_id bigint NOT NULL REFERENCES accounts (id),\n  amount numeric(12, 2) NOT NULL\n);\n",
        );
        write("0002_entries.down.sql", "DROP TABLE entries;\n");
        Service { dir }
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    /// `pgstack ARGS` in `folder` of the service, with a clean environment.
    fn pgstack_in(&self, folder: &str, args: &[&str]) -> Command {
        let mut cmd = pgstack(args);
        cmd.current_dir(self.root().join(folder));
        cmd
    }

    fn pgstack(&self, args: &[&str]) -> Command {
        self.pgstack_in("", args)
    }
}

async fn tables(cluster: &TestCluster, database: &str) -> Vec<String> {
    let client = cluster.client(database).await.unwrap();
    client
        .query(
            "SELECT relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = 'public' AND c.relkind = 'r' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

fn versions(status: &Value, state: &str) -> Vec<i64> {
    status["migrations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["state"] == state)
        .map(|m| m["version"].as_i64().unwrap())
        .collect()
}

#[tokio::test]
async fn every_command_works_on_the_service_folder_and_its_schema_only() {
    let cluster = TestCluster::start().await.unwrap();
    let service = Service::new(&cluster, "ledger");

    // db-reset from a subfolder: the project is found upwards by its pgstack.toml.
    let reset = json_of(&mut service.pgstack_in("src", &["db-reset", "--json"]));
    assert_eq!(reset["database"], "ledger", "{reset}");
    assert_eq!(reset["applied"], serde_json::json!([1, 2]), "{reset}");
    assert_eq!(
        tables(&cluster, "ledger").await,
        [
            "_sqlx_migrations",
            "accounts",
            "entries",
            "pgstack_metadata"
        ],
        "the service's schema, and nothing of the reference schema"
    );

    // migrate status | down | up.
    let status = json_of(&mut service.pgstack(&["migrate", "status", "--json"]));
    assert_eq!(versions(&status, "applied"), [1, 2], "{status}");
    let down = json_of(&mut service.pgstack(&["migrate", "down", "--json"]));
    assert_eq!(down["reverted"][0]["version"], 2, "{down}");
    assert!(
        !tables(&cluster, "ledger")
            .await
            .contains(&"entries".to_owned())
    );
    let status = json_of(&mut service.pgstack(&["migrate", "status", "--json"]));
    assert_eq!(versions(&status, "applied"), [1], "{status}");
    assert_eq!(versions(&status, "pending"), [2], "{status}");
    let up = json_of(&mut service.pgstack(&["migrate", "up", "--json"]));
    assert_eq!(up["applied"][0]["version"], 2, "{up}");
    assert_eq!(up["pending"], 0, "{up}");

    // --migrations names another folder: here an empty one, so both applied
    // migrations have no file.
    let empty = tempfile::tempdir().unwrap();
    let status = json_of(&mut service.pgstack(&[
        "migrate",
        "status",
        "--json",
        "--migrations",
        empty.path().to_str().unwrap(),
    ]));
    assert_eq!(versions(&status, "missing_file"), [1, 2], "{status}");

    // health: the service's primary, healthy.
    let out = service.pgstack(&["health", "--json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let health = json(&out);
    assert_eq!(health["status"], "healthy", "{health}");

    // config: the service's file is the source.
    let config = json_of(&mut service.pgstack(&["config", "--json"]));
    let entry = |key: &str| {
        config["entries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["key"] == key)
            .unwrap_or_else(|| panic!("no {key} in {config}"))
            .clone()
    };
    assert_eq!(entry("primary.database")["value"], "ledger");
    assert!(
        entry("primary.database")["source"]
            .as_str()
            .unwrap()
            .contains("pgstack.toml"),
        "{config}"
    );
    assert_eq!(entry("query.application_name")["value"], "ledger");

    // doctor: the service's own foreign key without an index, and nothing else.
    let out = service.pgstack(&["doctor", "--json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", explain(&out));
    let doctor = json(&out);
    assert_eq!(doctor["database"], "ledger", "{doctor}");
    let findings: Vec<(String, String)> = doctor["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["check"].as_str().unwrap().to_owned(),
                f["subject"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        findings,
        [(
            "fk_without_index".to_owned(),
            "public.entries (account_id)".to_owned()
        )],
        "{doctor}"
    );

    // DATABASE_URL wins over the file: another database gets the same schema.
    let out = ok(service
        .pgstack(&["db-reset", "--json"])
        .env("DATABASE_URL", cluster.url("ledger_ci")));
    assert_eq!(json(&out)["database"], "ledger_ci");
    assert_eq!(
        tables(&cluster, "ledger_ci").await,
        [
            "_sqlx_migrations",
            "accounts",
            "entries",
            "pgstack_metadata"
        ]
    );
}

#[test]
fn the_development_server_of_a_service_lives_in_its_own_target() {
    // No primary anywhere: the development server, under the service's target/.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("Cargo.toml"), "[package]\nname = \"svc\"\n").unwrap();
    std::fs::create_dir_all(dir.path().join("src/bin")).unwrap();
    let out = ok(pgstack(&["db-status", "--json"]).current_dir(dir.path().join("src/bin")));
    let status = json(&out);
    assert_eq!(status["running"], false, "{status}");
    assert_eq!(
        PathBuf::from(status["data_dir"].as_str().unwrap()),
        dir.path().join("target/pgstack-dev/data")
    );
}
