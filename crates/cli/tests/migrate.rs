//! `pgstack migrate …`, run as the real binary against real servers from
//! the test kit: status, up, down, validate, dry-run, new, baseline and
//! forget-failed, with human and JSON output; `down` refuses production and
//! changes nothing; usage errors exit 2; passwords never show.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::Command;

use pgstack_tests::TestDb;
use serde_json::Value;

/// The reference schema's migration versions.
fn versions() -> Vec<i64> {
    let mut versions: Vec<i64> = std::fs::read_dir(root().join("migrations"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".up.sql"))
        .map(|name| name.split('_').next().unwrap().parse().unwrap())
        .collect();
    versions.sort_unstable();
    versions
}

fn latest() -> i64 {
    *versions().last().unwrap()
}

/// Runs `migrate <args> --database-url <url>`.
fn migrate(db_url: &str, args: &[&str]) -> Command {
    let mut all = vec!["migrate"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--database-url", db_url]);
    pgstack(&all)
}

fn ints(value: &Value) -> Vec<i64> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect()
}

/// The versions of a `steps` / `applied` / `reverted` array of objects.
fn step_versions(value: &Value) -> Vec<i64> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_i64().unwrap())
        .collect()
}

/// `(version, state)` of every entry of `migrate status --json`.
fn states(status: &Value) -> Vec<(i64, String)> {
    status["migrations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["version"].as_i64().unwrap(),
                m["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

async fn applied(db: &TestDb) -> Vec<i64> {
    let client = db.client().await.unwrap();
    let exists: bool = client
        .query_one("SELECT to_regclass('_sqlx_migrations') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    if !exists {
        return Vec::new();
    }
    client
        .query(
            "SELECT version FROM _sqlx_migrations WHERE success ORDER BY version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

async fn has_table(db: &TestDb, table: &str) -> bool {
    db.client()
        .await
        .unwrap()
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await
        .unwrap()
        .get(0)
}

/// A copy of the reference migrations in a temporary folder.
fn copy_of_migrations() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(root().join("migrations")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

fn file_of(dir: &Path, prefix: &str) -> PathBuf {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix))
        .unwrap_or_else(|| panic!("no {prefix}* in {}", dir.display()))
}

#[tokio::test]
async fn status_up_and_down_in_human_and_json_output() {
    let db = TestDb::new().await.unwrap();
    let all = versions();
    let n = all.len();

    let out = ok(&mut migrate(db.url(), &["status"]));
    let text = stdout(&out);
    assert!(text.contains(&format!("/{}", db.name())), "{text}");
    assert!(
        text.contains(&format!("Current: no migration applied; {n} pending.")),
        "{text}"
    );
    assert!(text.contains("pending") && text.contains("users"), "{text}");

    let status = json_of(&mut migrate(db.url(), &["status", "--json"]));
    assert_eq!(status["table_exists"], false);
    assert_eq!(status["current_version"], Value::Null);
    assert_eq!(status["pending"], n);
    assert!(states(&status).iter().all(|(_, s)| s == "pending"));

    let up = json_of(&mut migrate(db.url(), &["up", "--to", "2", "--json"]));
    assert_eq!(step_versions(&up["applied"]), vec![1, 2]);
    assert_eq!(up["current_version"], 2);
    assert_eq!(up["pending"], n - 2);
    assert_eq!(applied(&db).await, vec![1, 2]);

    let status = json_of(&mut migrate(db.url(), &["status", "--json"]));
    let expected: Vec<(i64, String)> = all
        .iter()
        .map(|&v| (v, if v <= 2 { "applied" } else { "pending" }.to_owned()))
        .collect();
    assert_eq!(states(&status), expected);
    assert_eq!(status["up_to_date"], false);
    assert!(status["migrations"][0]["installed_on"].is_string());

    let out = ok(&mut migrate(db.url(), &["up"]));
    let text = stdout(&out);
    assert!(
        text.contains(&format!("Applied {} migration(s)", n - 2)),
        "{text}"
    );
    assert!(
        text.contains(&format!("Current: version {}; 0 pending.", latest())),
        "{text}"
    );
    assert_eq!(applied(&db).await, all);

    let out = ok(&mut migrate(db.url(), &["up"]));
    assert!(
        stdout(&out).contains("Nothing to apply"),
        "{}",
        explain(&out)
    );

    // down: one step by default, then --steps, then --to.
    let out = ok(&mut migrate(db.url(), &["down"]));
    let text = stdout(&out);
    assert!(text.contains("Reverted 1 migration(s)"), "{text}");
    assert_eq!(applied(&db).await, all[..n - 1]);

    let down = json_of(&mut migrate(db.url(), &["down", "--steps", "2", "--json"]));
    assert_eq!(
        step_versions(&down["reverted"]),
        vec![all[n - 2], all[n - 3]]
    );
    assert_eq!(down["current_version"], all[n - 4]);
    assert_eq!(applied(&db).await, all[..n - 3]);

    let down = json_of(&mut migrate(db.url(), &["down", "--to", "0", "--json"]));
    assert_eq!(step_versions(&down["reverted"]), vec![2, 1]);
    assert_eq!(down["current_version"], Value::Null);
    assert!(applied(&db).await.is_empty());
    assert!(!has_table(&db, "users").await);
}

#[tokio::test]
async fn dry_runs_print_the_plan_and_the_sql_and_change_nothing() {
    let db = TestDb::new().await.unwrap();
    let n = versions().len();

    let out = ok(&mut migrate(db.url(), &["dry-run"]));
    let text = stdout(&out);
    assert!(text.contains("nothing will be changed"), "{text}");
    assert!(
        text.contains(&format!("{n} migration(s) would run")),
        "{text}"
    );
    assert!(text.contains("CREATE TABLE users"), "{text}");
    assert!(text.contains("0001_users.up.sql"), "{text}");
    assert!(
        !has_table(&db, "_sqlx_migrations").await,
        "a dry run created the bookkeeping table"
    );

    let plan = json_of(&mut migrate(db.url(), &["dry-run", "--to", "3", "--json"]));
    assert_eq!(plan["dry_run"], true);
    assert_eq!(step_versions(&plan["steps"]), vec![1, 2, 3]);
    assert!(
        plan["steps"][0]["sql"]
            .as_str()
            .unwrap()
            .contains("CREATE TABLE users")
    );
    assert_eq!(plan["steps"][0]["direction"], "up");

    let plan = json_of(&mut migrate(db.url(), &["up", "--dry-run", "--json"]));
    assert_eq!(step_versions(&plan["steps"]), versions());
    assert!(!has_table(&db, "users").await);

    ok(&mut migrate(db.url(), &["up"]));
    let all = versions();
    let plan = json_of(&mut migrate(
        db.url(),
        &["down", "--dry-run", "--steps", "2", "--json"],
    ));
    assert_eq!(step_versions(&plan["steps"]), vec![all[n - 1], all[n - 2]]);
    assert_eq!(plan["steps"][0]["direction"], "down");
    assert!(
        plan["steps"][0]["file"]
            .as_str()
            .unwrap()
            .ends_with(".down.sql")
    );
    let out = ok(&mut migrate(db.url(), &["down", "--dry-run", "--to", "0"]));
    assert!(
        stdout(&out).contains("DROP TABLE users"),
        "{}",
        explain(&out)
    );
    assert_eq!(applied(&db).await, all, "a dry run reverted something");
}

#[tokio::test]
async fn down_refuses_under_production_and_changes_nothing() {
    let db = TestDb::new().await.unwrap();
    let all = versions();
    ok(&mut migrate(db.url(), &["up"]));

    let out = fails(migrate(db.url(), &["down"]).env("APP_ENV", "production"), 1);
    let err = stderr(&out);
    assert!(
        err.contains("migrate down refused; nothing was changed"),
        "{err}"
    );
    assert!(err.contains("the environment is production"), "{err}");
    assert!(
        err.contains(&format!("--confirm-destroy {}", db.name())),
        "{err}"
    );
    assert_eq!(
        applied(&db).await,
        all,
        "a refused down changed the database"
    );

    let out = fails(
        migrate(
            db.url(),
            &["down", "--to", "0", "--confirm-destroy", "other_db"],
        )
        .env("APP_ENV", "production"),
        1,
    );
    assert!(
        stderr(&out).contains("--confirm-destroy names `other_db`"),
        "{}",
        explain(&out)
    );
    assert_eq!(applied(&db).await, all);

    // --env says the same as APP_ENV.
    let out = fails(&mut migrate(db.url(), &["down", "--env", "production"]), 1);
    assert!(
        stderr(&out).contains("the environment is production"),
        "{}",
        explain(&out)
    );
    assert_eq!(applied(&db).await, all);
}

#[tokio::test]
async fn down_refuses_a_database_recorded_as_production() {
    let db = TestDb::new().await.unwrap();
    let all = versions();
    // `up` records the environment it ran in; this database says production.
    // (The production profile demands TLS, which the kit's servers do not offer,
    // so the record is written directly.)
    ok(&mut migrate(db.url(), &["up"]));
    db.client()
        .await
        .unwrap()
        .batch_execute("UPDATE pgstack_metadata SET value = 'production' WHERE key = 'environment'")
        .await
        .unwrap();
    let out = fails(&mut migrate(db.url(), &["down"]), 1);
    let err = stderr(&out);
    assert!(
        err.contains("records that it is a production database"),
        "{err}"
    );
    assert!(!err.contains("the environment is production"), "{err}");
    assert_eq!(applied(&db).await, all);

    // A dry run changes nothing, so it runs, and says what the real run needs.
    let out = ok(&mut migrate(db.url(), &["down", "--dry-run"]));
    assert!(
        stdout(&out).contains(&format!("needs --confirm-destroy {}", db.name())),
        "{}",
        explain(&out)
    );
    let plan = json_of(&mut migrate(db.url(), &["down", "--dry-run", "--json"]));
    assert!(
        plan["needs_confirmation"][0]
            .as_str()
            .unwrap()
            .contains("records that it is a production database")
    );
    assert_eq!(applied(&db).await, all);

    let out = ok(&mut migrate(
        db.url(),
        &["down", "--confirm-destroy", db.name()],
    ));
    assert!(stdout(&out).contains("Reverted 1 migration(s)"));
    assert_eq!(applied(&db).await, all[..all.len() - 1]);
}

#[test]
fn down_refuses_a_remote_host_before_connecting_and_never_shows_the_password() {
    let out = fails(
        &mut migrate(
            "postgres://app:s3cret-pw@db.example.invalid:5432/app",
            &["down"],
        ),
        1,
    );
    let all = explain(&out);
    assert!(
        all.contains("the host `db.example.invalid` is not local"),
        "{all}"
    );
    assert!(all.contains("--confirm-destroy app"), "{all}");
    assert!(!all.contains("s3cret-pw"), "the password leaked: {all}");
}

#[tokio::test]
async fn validate_exits_1_when_an_applied_migration_changed_or_vanished() {
    let db = TestDb::new().await.unwrap();
    let dir = copy_of_migrations();
    let with_dir = |args: &[&str]| {
        let mut cmd = migrate(db.url(), args);
        cmd.env("PGSTACK_MIGRATIONS__DIR", dir.path());
        cmd
    };
    ok(&mut with_dir(&["up"]));

    let out = ok(&mut with_dir(&["validate"]));
    assert!(stdout(&out).starts_with("Valid:"), "{}", explain(&out));
    let report = json_of(&mut with_dir(&["validate", "--json"]));
    assert_eq!(report["valid"], true);
    assert_eq!(report["problems"].as_array().unwrap().len(), 0);

    // Edit an applied migration: a comment is enough.
    let edited = file_of(dir.path(), "0002_");
    let mut sql = std::fs::read_to_string(&edited).unwrap();
    sql.push_str("\n-- an afterthought\n");
    std::fs::write(&edited, sql).unwrap();

    let out = fails(&mut with_dir(&["validate"]), 1);
    let text = stdout(&out);
    assert!(text.starts_with("Invalid:"), "{text}");
    assert!(text.contains("checksum mismatch"), "{text}");
    assert!(text.contains("new migration"), "{text}");

    let out = fails(&mut with_dir(&["validate", "--json"]), 1);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["valid"], false);
    assert_eq!(step_versions(&report["problems"]), vec![2]);
    assert_eq!(report["problems"][0]["state"], "checksum_mismatch");

    let status = json_of(&mut with_dir(&["status", "--json"]));
    assert!(states(&status).contains(&(2, "checksum_mismatch".to_owned())));

    // up refuses to run over a changed file.
    let out = fails(&mut with_dir(&["up"]), 1);
    assert!(
        stderr(&out).contains("changed after it was applied"),
        "{}",
        explain(&out)
    );

    // The same folder named by a configuration file, with a file gone.
    let last = latest();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(&format!("{last:04}_"))
        {
            std::fs::remove_file(path).unwrap();
        }
    }
    let config_dir = tempfile::tempdir().unwrap();
    let config = config_dir.path().join("pgstack.toml");
    std::fs::write(
        &config,
        format!(
            "[default]\nmigrations.dir = {:?}\n",
            dir.path().display().to_string()
        ),
    )
    .unwrap();
    let out = fails(
        &mut migrate(
            db.url(),
            &["validate", "--json", "--config", config.to_str().unwrap()],
        ),
        1,
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(step_versions(&report["problems"]), vec![2, last]);
    assert_eq!(report["problems"][1]["state"], "missing_file");
}

#[tokio::test]
async fn new_writes_the_next_reversible_pair() {
    let db = TestDb::new().await.unwrap();
    let dir = copy_of_migrations();
    let next = latest() + 1;

    let created = json_of(
        pgstack(&["migrate", "new", "add bill status", "--json"])
            .env("PGSTACK_MIGRATIONS__DIR", dir.path()),
    );
    assert_eq!(created["version"], next);
    let up = PathBuf::from(created["up"].as_str().unwrap());
    let down = PathBuf::from(created["down"].as_str().unwrap());
    assert_eq!(
        up.file_name().unwrap().to_string_lossy(),
        format!("{next:04}_add_bill_status.up.sql")
    );
    assert_eq!(
        down.file_name().unwrap().to_string_lossy(),
        format!("{next:04}_add_bill_status.down.sql")
    );
    assert!(up.is_file() && down.is_file());
    assert_eq!(up.parent().unwrap(), dir.path());

    // --dir names the folder; human output names the files.
    let out = ok(&mut pgstack(&[
        "migrate",
        "new",
        "add-bill-index",
        "--dir",
        dir.path().to_str().unwrap(),
    ]));
    let text = stdout(&out);
    assert!(
        text.contains(&format!("Created migration {}", next + 1)),
        "{text}"
    );
    assert!(
        text.contains(&format!("{:04}_add_bill_index.down.sql", next + 1)),
        "{text}"
    );

    // The new pair applies and reverts.
    std::fs::write(&up, "ALTER TABLE bills ADD COLUMN status_note text;\n").unwrap();
    std::fs::write(&down, "ALTER TABLE bills DROP COLUMN status_note;\n").unwrap();
    let up_report =
        json_of(migrate(db.url(), &["up", "--json"]).env("PGSTACK_MIGRATIONS__DIR", dir.path()));
    assert_eq!(up_report["current_version"], next + 1);
    let down_report = json_of(
        migrate(db.url(), &["down", "--steps", "2", "--json"])
            .env("PGSTACK_MIGRATIONS__DIR", dir.path()),
    );
    assert_eq!(
        step_versions(&down_report["reverted"]),
        vec![next + 1, next]
    );

    let out = fails(
        pgstack(&["migrate", "new", "bad/name"]).env("PGSTACK_MIGRATIONS__DIR", dir.path()),
        1,
    );
    assert!(
        stderr(&out).contains("invalid migration name"),
        "{}",
        explain(&out)
    );
}

#[tokio::test]
async fn baseline_records_migrations_without_running_them() {
    let db = TestDb::new().await.unwrap();
    let all = versions();

    let report = json_of(&mut migrate(db.url(), &["baseline", "3", "--json"]));
    assert_eq!(ints(&report["baselined"]), vec![1, 2, 3]);
    assert_eq!(report["current_version"], 3);
    assert_eq!(applied(&db).await, vec![1, 2, 3]);
    assert!(
        !has_table(&db, "users").await,
        "baseline ran a migration's SQL"
    );

    let out = ok(&mut migrate(db.url(), &["baseline", "3"]));
    assert!(
        stdout(&out).contains("Nothing to record"),
        "{}",
        explain(&out)
    );
    let out = ok(&mut migrate(db.url(), &["baseline", "4"]));
    assert!(
        stdout(&out).contains("Recorded 1 migration(s) as applied without running them: 4."),
        "{}",
        explain(&out)
    );

    let out = fails(&mut migrate(db.url(), &["baseline", "99"]), 1);
    assert!(
        stderr(&out).contains("99 is not in the migrations folder"),
        "{}",
        explain(&out)
    );
    assert_eq!(applied(&db).await, all[..4]);
}

#[tokio::test]
async fn forget_failed_clears_the_mark_of_a_migration_that_stopped_part_way() {
    let db = TestDb::new().await.unwrap();
    let dir = copy_of_migrations();
    let broken = latest() + 1;
    let broken_file = dir.path().join(format!("{broken:04}_backfill.up.sql"));
    // Outside a transaction, a runtime error (not a syntax error) leaves the version marked failed.
    std::fs::write(&broken_file, "-- no-transaction\nSELECT 1 / 0;\n").unwrap();
    let with_dir = |args: &[&str]| {
        let mut cmd = migrate(db.url(), args);
        cmd.env("PGSTACK_MIGRATIONS__DIR", dir.path());
        cmd
    };

    let out = fails(&mut with_dir(&["up"]), 1);
    assert!(
        stderr(&out).contains(&format!("migrate forget-failed {broken}")),
        "{}",
        explain(&out)
    );
    let status = json_of(&mut with_dir(&["status", "--json"]));
    assert!(states(&status).contains(&(broken, "failed".to_owned())));
    assert_eq!(status["problems"], 1);
    let out = fails(&mut with_dir(&["validate"]), 1);
    assert!(stdout(&out).contains("failed (dirty)"), "{}", explain(&out));
    let out = fails(&mut with_dir(&["up"]), 1);
    assert!(
        stderr(&out).contains("is marked failed"),
        "{}",
        explain(&out)
    );

    // The repair: fix the file, forget the mark, run again.
    std::fs::write(&broken_file, "-- no-transaction\nSELECT 1;\n").unwrap();
    let report = json_of(&mut with_dir(&[
        "forget-failed",
        &broken.to_string(),
        "--json",
    ]));
    assert_eq!(report["removed"], true);
    assert_eq!(report["version"], broken);
    let up = json_of(&mut with_dir(&["up", "--json"]));
    assert_eq!(step_versions(&up["applied"]), vec![broken]);

    let out = fails(&mut with_dir(&["forget-failed", &broken.to_string()]), 1);
    assert!(
        stderr(&out).contains(&format!("migration {broken} has no failed mark")),
        "{}",
        explain(&out)
    );
    let out = ok(&mut with_dir(&["validate"]));
    assert!(stdout(&out).starts_with("Valid:"), "{}", explain(&out));
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        vec!["migrate"],
        vec!["migrate", "sideways"],
        vec!["migrate", "up", "--to", "latest"],
        vec!["migrate", "down", "--steps", "1", "--to", "2"],
        vec!["migrate", "down", "--steps", "0"],
        vec!["migrate", "down", "--to", "-1"],
        vec!["migrate", "baseline"],
        vec!["migrate", "forget-failed", "three"],
        vec!["migrate", "new"],
        vec!["migrate", "status", "--timeout", "soon"],
    ] {
        let out = pgstack(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", explain(&out));
        // clap's message (or, for a missing subcommand, the help) on stderr only.
        assert!(out.stdout.is_empty(), "{args:?}: {}", explain(&out));
        let err = stderr(&out);
        assert!(
            err.starts_with("error:") || err.contains("Usage: pgstack migrate"),
            "{args:?}: {}",
            explain(&out)
        );
    }
    let out = ok(&mut pgstack(&["migrate", "--help"]));
    let help = stdout(&out);
    for command in [
        "status",
        "up",
        "down",
        "validate",
        "dry-run",
        "new",
        "baseline",
        "forget-failed",
        "lint",
    ] {
        assert!(help.contains(command), "{command} missing from:\n{help}");
    }
}

#[tokio::test]
async fn the_password_never_shows() {
    let db = TestDb::new().await.unwrap();
    let password = "s3cret-Pw-4";
    // The kit's servers trust local connections, so the password is accepted and ignored.
    let url = with_password(db.url(), password);
    let dir = copy_of_migrations();
    std::fs::write(
        dir.path()
            .join(format!("{:04}_broken.up.sql", latest() + 1)),
        "CREATE TABLEE oops (id int);\n",
    )
    .unwrap();

    let mut outputs = Vec::new();
    for args in [
        vec!["status"],
        vec!["status", "--json", "--verbose"],
        vec!["dry-run"],
        vec!["up", "--to", "2", "--json"],
        vec!["up", "--verbose"],
        vec!["validate", "--json"],
        vec!["down", "--dry-run", "--json"],
        vec!["down", "--verbose"],
        vec!["baseline", "1"],
        vec!["forget-failed", "1"],
    ] {
        let mut cmd = migrate(&url, &args);
        cmd.env("PGSTACK_MIGRATIONS__DIR", dir.path());
        outputs.push((args, cmd.output().unwrap()));
    }
    // A server that is not there, and production refusals.
    outputs.push((
        vec!["status (no server)"],
        migrate(
            &format!("postgres://postgres:{password}@127.0.0.1:1/nowhere"),
            &["status"],
        )
        .output()
        .unwrap(),
    ));
    outputs.push((
        vec!["down (production)"],
        migrate(&url, &["down"])
            .env("APP_ENV", "production")
            .output()
            .unwrap(),
    ));

    for (args, out) in &outputs {
        let all = explain(out);
        assert!(
            !all.contains(password),
            "{args:?} printed the password: {all}"
        );
    }
    // The run with the broken migration did fail, and said where.
    let (_, up) = &outputs[4];
    assert_eq!(up.status.code(), Some(1), "{}", explain(up));
    assert!(
        stderr(up).contains("broken.up.sql, line 1"),
        "{}",
        explain(up)
    );
    let (_, nowhere) = &outputs[10];
    assert_eq!(nowhere.status.code(), Some(1), "{}", explain(nowhere));
    assert!(
        stderr(nowhere).contains("error: nothing listens on 127.0.0.1:1 (connection refused)"),
        "{}",
        explain(nowhere)
    );
}

#[test]
fn with_no_database_url_it_works_on_the_development_cluster() {
    let dev = DevDir::new("pgstack-migrate-");
    let dir = dev.path();

    let up = json_of(pgstack(&["migrate", "up", "--json"]).env("PGSTACK_DEV_DIR", dir));
    assert_eq!(up["current_version"], latest());
    assert_eq!(up["database"], pgstack_tests::DevCluster::DATABASE);
    assert!(
        up["target"]
            .as_str()
            .unwrap()
            .starts_with("postgres://postgres@127.0.0.1:")
    );

    let out = ok(pgstack(&["migrate", "status"]).env("PGSTACK_DEV_DIR", dir));
    assert!(
        stdout(&out).contains(&format!("Current: version {}; 0 pending.", latest())),
        "{}",
        explain(&out)
    );
    let out = ok(pgstack(&["migrate", "down", "--to", "0"]).env("PGSTACK_DEV_DIR", dir));
    assert!(
        stdout(&out).contains(&format!("Reverted {} migration(s)", versions().len())),
        "{}",
        explain(&out)
    );
}

#[tokio::test]
async fn a_second_migrator_waits_for_the_lock_then_gives_up_naming_the_holder() {
    let db = TestDb::new().await.unwrap();
    let dir = copy_of_migrations();
    std::fs::write(
        dir.path().join(format!("{:04}_slow.up.sql", latest() + 1)),
        "SELECT pg_sleep(4);\n",
    )
    .unwrap();
    ok(&mut migrate(db.url(), &["up"]));

    // The first migrator holds the lock while its slow migration runs.
    let first = migrate(db.url(), &["up"])
        .env("PGSTACK_MIGRATIONS__DIR", dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let client = db.client().await.unwrap();
    let mut running = false;
    for _ in 0..100 {
        running = client
            .query_one(
                "SELECT count(*) > 0 FROM pg_stat_activity WHERE query LIKE '%pg_sleep(4)%' AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if running {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        running,
        "the first migrator never started its slow migration"
    );

    let out = fails(
        migrate(db.url(), &["up"])
            .env("PGSTACK_MIGRATIONS__DIR", dir.path())
            .env("PGSTACK_MIGRATIONS__LOCK_TIMEOUT", "1s"),
        1,
    );
    let err = stderr(&out);
    assert!(
        err.contains("waiting for the migration lock held by pid"),
        "{err}"
    );
    assert!(
        err.contains("gave up waiting for the migration lock after"),
        "{err}"
    );
    assert!(err.contains("\"pgstack migrate up\""), "{err}");
    assert!(err.contains("migrations.lock_timeout"), "{err}");

    let first = first.wait_with_output().unwrap();
    assert!(first.status.success(), "{}", explain(&first));
    assert_eq!(applied(&db).await.last(), Some(&(latest() + 1)));
}

/// `migrate lint` with the migrations folder `dir`, no database named, and the development
/// cluster's folder `dev` (which lint without `--pending` must not start).
fn lint_in(dir: &Path, dev: &Path, args: &[&str]) -> Command {
    let mut all = vec!["migrate", "lint"];
    all.extend_from_slice(args);
    let mut cmd = pgstack(&all);
    cmd.env("PGSTACK_MIGRATIONS__DIR", dir)
        .env("PGSTACK_DEV_DIR", dev);
    cmd
}

#[test]
fn lint_checks_every_file_without_a_database_and_exits_1_on_errors() {
    let dev = tempfile::tempdir().unwrap();
    let dev_dir = dev.path().join("dev");
    let dir = copy_of_migrations();
    let n = versions().len();

    let out = ok(&mut lint_in(dir.path(), &dev_dir, &[]));
    let text = stdout(&out);
    assert!(text.contains("no lock hazard found"), "{text}");
    assert!(
        text.contains(&format!("{n} file(s) checked: 0 error(s), 0 warning(s)")),
        "{text}"
    );

    // A warning alone does not fail.
    std::fs::write(
        dir.path()
            .join(format!("{:04}_drop_summary.up.sql", latest() + 1)),
        "-- the summary moved to the documents service\nALTER TABLE bills DROP COLUMN summary;\n",
    )
    .unwrap();
    let out = ok(&mut lint_in(dir.path(), &dev_dir, &[]));
    assert!(
        stdout(&out).contains("error(s), 1 warning(s)"),
        "{}",
        explain(&out)
    );

    // An error does; an allowed finding is counted, not reported.
    let index = format!("{:04}_title_idx.up.sql", latest() + 2);
    std::fs::write(
        dir.path().join(&index),
        "CREATE INDEX bills_title_idx ON bills (title);\n\
         -- pgstack:allow ban-drop-column (nobody reads it)\n\
         ALTER TABLE users DROP COLUMN display_name;\n",
    )
    .unwrap();
    let out = fails(&mut lint_in(dir.path(), &dev_dir, &[]), 1);
    let text = stdout(&out);
    assert!(
        text.contains(&format!(
            "{index}:1: error [require-concurrent-index-creation] CREATE INDEX bills_title_idx on bills"
        )),
        "{text}"
    );
    assert!(
        text.contains("instead: CREATE INDEX CONCURRENTLY"),
        "{text}"
    );
    assert!(
        text.contains("drop_summary.up.sql:2: warning [ban-drop-column]"),
        "{text}"
    );
    assert!(
        text.contains("1 error(s), 1 warning(s), 1 allowed by `-- pgstack:allow`"),
        "{text}"
    );
    assert!(text.contains("-- pgstack:allow RULE"), "{text}");

    let out = fails(&mut lint_in(dir.path(), &dev_dir, &["--json"]), 1);
    let report = json(&out);
    assert_eq!(report["files"], n + 2);
    assert_eq!(report["errors"], 1);
    assert_eq!(report["warnings"], 1);
    assert_eq!(report["allowed"], 1);
    assert_eq!(report["pending_only"], false);
    let error = &report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["severity"] == "error")
        .unwrap();
    assert_eq!(error["rule"], "require-concurrent-index-creation");
    assert_eq!(error["version"], latest() + 2);
    assert_eq!(error["line"], 1);
    assert!(error["file"].as_str().unwrap().ends_with(&index));
    assert!(error["why"].as_str().unwrap().contains("SHARE lock"));
    assert!(error["fix"].as_str().unwrap().contains("CONCURRENTLY"));

    assert!(
        !dev_dir.exists(),
        "lint without --pending started the development cluster"
    );
}

#[tokio::test]
async fn lint_pending_validate_and_dry_run_show_the_findings_of_pending_migrations() {
    let db = TestDb::new().await.unwrap();
    let dir = copy_of_migrations();
    let with_dir = |args: &[&str]| {
        let mut cmd = migrate(db.url(), args);
        cmd.env("PGSTACK_MIGRATIONS__DIR", dir.path());
        cmd
    };
    ok(&mut with_dir(&["up"]));
    let next = latest() + 1;
    std::fs::write(
        dir.path().join(format!("{next:04}_status_idx.up.sql")),
        "CREATE INDEX bills_status_title_idx ON bills (status, title);\n",
    )
    .unwrap();

    let report = json(&fails(&mut with_dir(&["lint", "--pending", "--json"]), 1));
    assert_eq!(report["pending_only"], true);
    assert_eq!(report["files"], 1);
    assert_eq!(report["findings"][0]["version"], next);

    // validate and dry-run report it, as a warning
    let out = ok(&mut with_dir(&["validate"]));
    let text = stdout(&out);
    assert!(text.starts_with("Valid:"), "{text}");
    assert!(
        text.contains("Lint: 1 finding(s) in the pending migrations")
            && text.contains("status_idx.up.sql:1: error [require-concurrent-index-creation]"),
        "{text}"
    );
    let validation = json_of(&mut with_dir(&["validate", "--json"]));
    assert_eq!(validation["valid"], true);
    assert_eq!(
        validation["lint"][0]["rule"],
        "require-concurrent-index-creation"
    );
    let out = ok(&mut with_dir(&["dry-run"]));
    assert!(
        stdout(&out).contains(
            "-- lint error [require-concurrent-index-creation] line 1: CREATE INDEX bills_status_title_idx on bills"
        ),
        "{}",
        explain(&out)
    );
    let plan = json_of(&mut with_dir(&["dry-run", "--json"]));
    assert_eq!(plan["lint"].as_array().unwrap().len(), 1);

    ok(&mut with_dir(&["up"]));
    let out = ok(&mut with_dir(&["lint", "--pending"]));
    assert!(
        stdout(&out).contains("no lock hazard found"),
        "{}",
        explain(&out)
    );
}

#[tokio::test]
async fn forget_failed_drops_the_invalid_index_a_failed_concurrent_build_left() {
    let db = TestDb::new().await.unwrap();
    let dir = copy_of_migrations();
    let table = latest() + 1;
    let index = latest() + 2;
    std::fs::write(
        dir.path().join(format!("{table:04}_dup.up.sql")),
        "CREATE TABLE dup (x int);\nINSERT INTO dup VALUES (1), (1);\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join(format!("{index:04}_dup_key.up.sql")),
        "-- no-transaction\nCREATE UNIQUE INDEX CONCURRENTLY dup_x_key ON dup (x);\n",
    )
    .unwrap();
    let with_dir = |args: &[&str]| {
        let mut cmd = migrate(db.url(), args);
        cmd.env("PGSTACK_MIGRATIONS__DIR", dir.path());
        cmd
    };

    let out = fails(&mut with_dir(&["up"]), 1);
    assert!(
        stderr(&out).contains("left the INVALID index public.dup_x_key behind"),
        "{}",
        explain(&out)
    );
    let out = ok(&mut with_dir(&["status"]));
    assert!(
        stdout(&out).contains(&format!(
            "INVALID index public.dup_x_key on dup (built by migration {index}); left by the failed \
             migration {index}: `pgstack migrate forget-failed {index}` drops it."
        )),
        "{}",
        explain(&out)
    );
    let status = json_of(&mut with_dir(&["status", "--json"]));
    assert_eq!(status["invalid_indexes"][0]["name"], "dup_x_key");
    assert_eq!(status["invalid_indexes"][0]["table"], "dup");
    assert_eq!(status["invalid_indexes"][0]["version"], index);

    // Fix the data, then forget the failure: the invalid index goes with the mark.
    db.client()
        .await
        .unwrap()
        .batch_execute("DELETE FROM dup WHERE ctid = (SELECT max(ctid) FROM dup)")
        .await
        .unwrap();
    let out = ok(&mut with_dir(&["forget-failed", &index.to_string()]));
    let text = stdout(&out);
    assert!(
        text.contains(&format!(
            "Dropped the INVALID index public.dup_x_key that migration {index} left."
        )),
        "{text}"
    );
    assert!(text.contains("Removed the failed mark"), "{text}");
    assert!(!has_table(&db, "dup_x_key").await);
    let up = json_of(&mut with_dir(&["up", "--json"]));
    assert_eq!(step_versions(&up["applied"]), vec![index]);
    let status = json_of(&mut with_dir(&["status", "--json"]));
    assert_eq!(status["invalid_indexes"], serde_json::json!([]));
    assert_eq!(status["up_to_date"], true);
}

#[tokio::test]
async fn up_gives_up_a_migration_after_lock_wait_and_lock_retries_from_the_configuration() {
    let db = TestDb::new().await.unwrap();
    let dir = copy_of_migrations();
    ok(&mut migrate(db.url(), &["up"]));
    let next = latest() + 1;
    std::fs::write(
        dir.path().join(format!("{next:04}_bill_pages.up.sql")),
        "ALTER TABLE bills ADD COLUMN pages int;\n",
    )
    .unwrap();
    let holder = db.client().await.unwrap();
    holder
        .batch_execute("SET application_name = 'reports'; BEGIN; SELECT count(*) FROM bills;")
        .await
        .unwrap();

    let out = fails(
        migrate(db.url(), &["up"])
            .env("PGSTACK_MIGRATIONS__DIR", dir.path())
            .env("PGSTACK_MIGRATIONS__LOCK_WAIT", "300ms")
            .env("PGSTACK_MIGRATIONS__LOCK_RETRIES", "1"),
        1,
    );
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "migration {next} gave up waiting 300.0ms (migrations.lock_wait) for"
        )) && err.contains("rolled back; attempt 2 of 2 in"),
        "{err}"
    );
    assert!(err.contains("that was the last attempt"), "{err}");
    assert!(
        err.contains("could not get the locks it needs: 2 attempt(s)")
            && err.contains("bill_pages.up.sql"),
        "{err}"
    );
    assert_eq!(applied(&db).await, versions(), "nothing recorded");

    holder.batch_execute("COMMIT").await.unwrap();
    let up =
        json_of(migrate(db.url(), &["up", "--json"]).env("PGSTACK_MIGRATIONS__DIR", dir.path()));
    assert_eq!(step_versions(&up["applied"]), vec![next]);
}
