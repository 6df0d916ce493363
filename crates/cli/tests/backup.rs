//! `pgstack backup` and `pgstack restore`, run as the real binary
//! against real servers from the test kit: a backup restored into another
//! database reproduces the data; restoring over a production database
//! refuses and changes nothing; a failed restore leaves nothing behind; the
//! password reaches pg_dump only through its environment.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use pgstack_tests::TestDb;

/// `url` with its database replaced.
fn url_of(url: &str, database: &str) -> String {
    let (base, _) = url.rsplit_once('/').unwrap();
    format!("{base}/{database}")
}

/// A database with the reference schema and a few rows in every table.
async fn source() -> TestDb {
    let db = TestDb::new().await.unwrap();
    ok(&mut pgstack(&["migrate", "up", "--database-url", db.url()]));
    db.client()
        .await
        .unwrap()
        .batch_execute(
            "INSERT INTO users (email, display_name, role) VALUES
                 ('ada@example.org', 'Ada', 'admin'), ('grace@example.org', 'Grace', 'editor');
             INSERT INTO sponsors (external_id, full_name, party, state, chamber, district) VALUES
                 ('L000001', 'Pat Lee', 'I', 'VT', 'senate', NULL),
                 ('R000002', 'Sam Roe', 'D', 'CA', 'house', 12);
             INSERT INTO bills (session, number, title, status, introduced_on, created_by) VALUES
                 (118, 'H.R. 1', 'An act', 'in_committee', '2024-01-03', 1),
                 (118, 'S. 2', 'Another act', 'enacted', '2024-02-01', 2);
             INSERT INTO bill_sponsors (bill_id, sponsor_id, is_primary) VALUES
                 (1, 2, true), (2, 1, true), (2, 2, false);",
        )
        .await
        .unwrap();
    db
}

/// Every row of the reference tables, as text, in a stable order.
async fn contents(url: &str) -> Vec<String> {
    let client = pgstack_tests::connect_url(url).await.unwrap();
    let mut all = Vec::new();
    for (table, order) in [
        ("users", "id"),
        ("sponsors", "id"),
        ("bills", "id"),
        ("bill_sponsors", "bill_id, sponsor_id"),
        ("_sqlx_migrations", "version"),
    ] {
        let row = client
            .query_one(
                &format!("SELECT coalesce(string_agg(t::text, E'\\n' ORDER BY {order}), '') FROM {table} t"),
                &[],
            )
            .await
            .unwrap();
        all.push(format!("{table}:\n{}", row.get::<_, String>(0)));
    }
    all
}

async fn has_table(url: &str, table: &str) -> bool {
    pgstack_tests::connect_url(url)
        .await
        .unwrap()
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await
        .unwrap()
        .get(0)
}

async fn database_exists(db: &TestDb, name: &str) -> bool {
    db.client()
        .await
        .unwrap()
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await
        .unwrap()
        .is_some()
}

async fn drop_database(db: &TestDb, name: &str) {
    db.client()
        .await
        .unwrap()
        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .await
        .unwrap();
}

/// A database with one table of its own and, when `production`, the production record.
async fn target(production: bool) -> TestDb {
    let db = TestDb::new().await.unwrap();
    let mut sql = "CREATE TABLE keepsake (id int); INSERT INTO keepsake VALUES (42);".to_owned();
    if production {
        sql.push_str(
            "CREATE TABLE pgstack_metadata (key text PRIMARY KEY, value text NOT NULL, updated_at timestamptz NOT NULL DEFAULT now());
             INSERT INTO pgstack_metadata (key, value) VALUES ('environment', 'production');",
        );
    }
    db.client()
        .await
        .unwrap()
        .batch_execute(&sql)
        .await
        .unwrap();
    db
}

async fn keepsake(db: &TestDb) -> Vec<i32> {
    db.client()
        .await
        .unwrap()
        .query("SELECT id FROM keepsake", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn a_backup_restored_into_a_new_database_reproduces_the_data() {
    let src = source().await;
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("nested").join("bills.dump");

    let report = json_of(&mut pgstack(&[
        "backup",
        "--database-url",
        src.url(),
        "--output",
        dump.to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(report["database"], src.name());
    assert_eq!(report["file"], dump.to_str().unwrap());
    let bytes = std::fs::metadata(&dump).unwrap().len();
    assert!(bytes > 0);
    assert_eq!(report["bytes"], bytes);
    assert!(std::fs::read(&dump).unwrap().starts_with(b"PGDMP"));
    assert_eq!(
        std::fs::read_dir(dump.parent().unwrap()).unwrap().count(),
        1,
        "something besides the dump was left behind"
    );

    // Into a new database, created by restore.
    let copy = format!("{}_copy", src.name());
    let restored = json_of(&mut pgstack(&[
        "restore",
        dump.to_str().unwrap(),
        "--into",
        &copy,
        "--create",
        "--database-url",
        src.url(),
        "--json",
    ]));
    assert_eq!(restored["database"], copy.as_str());
    assert_eq!(restored["created"], true);
    assert_eq!(restored["source_database"], src.name());
    let expected = contents(src.url()).await;
    assert_eq!(contents(&url_of(src.url(), &copy)).await, expected);
    // Identity sequences came along: the next user gets id 3.
    let client = pgstack_tests::connect_url(&url_of(src.url(), &copy))
        .await
        .unwrap();
    let id: i64 = client
        .query_one(
            "INSERT INTO users (email, display_name) VALUES ('linus@example.org', 'Linus') RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(id, 3);
    drop(client);

    // --create refuses a database that exists.
    let out = fails(
        &mut pgstack(&[
            "restore",
            dump.to_str().unwrap(),
            "--into",
            &copy,
            "--create",
            "--database-url",
            src.url(),
        ]),
        1,
    );
    assert!(stderr(&out).contains("already exists"), "{}", explain(&out));
    drop_database(&src, &copy).await;

    // Over an existing (empty) database, with human output.
    let other = TestDb::new().await.unwrap();
    let out = ok(&mut pgstack(&[
        "restore",
        dump.to_str().unwrap(),
        "--database-url",
        other.url(),
    ]));
    assert!(
        stdout(&out).contains(&format!("into the database `{}`", other.name())),
        "{}",
        explain(&out)
    );
    assert_eq!(contents(other.url()).await, expected);

    // Again over the same database: the dump's objects are replaced, not doubled.
    ok(&mut pgstack(&[
        "restore",
        dump.to_str().unwrap(),
        "--database-url",
        other.url(),
    ]));
    assert_eq!(contents(other.url()).await, expected);
}

#[tokio::test]
async fn restore_over_a_database_recorded_as_production_refuses_and_changes_nothing() {
    let src = source().await;
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("src.dump");
    ok(&mut pgstack(&[
        "backup",
        "--database-url",
        src.url(),
        "--output",
        dump.to_str().unwrap(),
    ]));
    let prod = target(true).await;

    let out = fails(
        &mut pgstack(&[
            "restore",
            dump.to_str().unwrap(),
            "--database-url",
            prod.url(),
        ]),
        1,
    );
    let err = stderr(&out);
    assert!(
        err.contains("restore refused; nothing was changed"),
        "{err}"
    );
    assert!(
        err.contains("records that it is a production database"),
        "{err}"
    );
    assert!(
        err.contains(&format!("--confirm-destroy {}", prod.name())),
        "{err}"
    );
    assert_eq!(keepsake(&prod).await, vec![42]);
    assert!(
        !has_table(prod.url(), "users").await,
        "a refused restore restored"
    );

    // A confirmation naming another database changes nothing either.
    let out = fails(
        &mut pgstack(&[
            "restore",
            dump.to_str().unwrap(),
            "--database-url",
            prod.url(),
            "--confirm-destroy",
            "someone_else",
        ]),
        1,
    );
    assert!(
        stderr(&out).contains("--confirm-destroy names `someone_else`"),
        "{}",
        explain(&out)
    );
    assert!(!has_table(prod.url(), "users").await);

    // The dry run shows the plan and what the real run needs.
    let plan = json_of(&mut pgstack(&[
        "restore",
        dump.to_str().unwrap(),
        "--database-url",
        prod.url(),
        "--dry-run",
        "--json",
    ]));
    assert_eq!(plan["dry_run"], true);
    assert_eq!(plan["source_database"], src.name());
    assert!(
        plan["needs_confirmation"][0]
            .as_str()
            .unwrap()
            .contains("production")
    );
    assert!(!has_table(prod.url(), "users").await, "a dry run restored");

    // Confirmed by name: restored; the objects that are not in the dump stay.
    let out = ok(&mut pgstack(&[
        "restore",
        dump.to_str().unwrap(),
        "--database-url",
        prod.url(),
        "--confirm-destroy",
        prod.name(),
    ]));
    assert!(stdout(&out).contains("Restored"), "{}", explain(&out));
    assert_eq!(contents(prod.url()).await, contents(src.url()).await);
    assert_eq!(keepsake(&prod).await, vec![42]);
}

#[tokio::test]
async fn restore_under_production_or_to_a_remote_host_refuses_before_connecting() {
    let src = source().await;
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("src.dump");
    ok(&mut pgstack(&[
        "backup",
        "--database-url",
        src.url(),
        "--output",
        dump.to_str().unwrap(),
    ]));
    let plain = target(false).await;

    for env in [
        vec![("APP_ENV", "production")],
        vec![("PGSTACK_ENV", "production")],
    ] {
        let out = fails(
            pgstack(&[
                "restore",
                dump.to_str().unwrap(),
                "--database-url",
                plain.url(),
            ])
            .envs(env),
            1,
        );
        let err = stderr(&out);
        assert!(
            err.contains("restore refused; nothing was changed"),
            "{err}"
        );
        assert!(err.contains("the environment is production"), "{err}");
    }
    let out = fails(
        &mut pgstack(&[
            "restore",
            dump.to_str().unwrap(),
            "--database-url",
            plain.url(),
            "--env",
            "production",
        ]),
        1,
    );
    assert!(stderr(&out).contains("the environment is production"));
    assert!(!has_table(plain.url(), "users").await);
    assert_eq!(keepsake(&plain).await, vec![42]);

    let out = fails(
        &mut pgstack(&[
            "restore",
            dump.to_str().unwrap(),
            "--database-url",
            "postgres://app:s3cret-pw@db.example.invalid:5432/app",
        ]),
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
async fn a_failed_restore_leaves_nothing_behind() {
    let src = source().await;
    // A table owned by a role that will not exist when the dump is restored with its owners.
    let role = format!("ghost_{}", std::process::id());
    src.client()
        .await
        .unwrap()
        .batch_execute(&format!(
            "CREATE ROLE {role}; CREATE TABLE haunted (id int); ALTER TABLE haunted OWNER TO {role};"
        ))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("src.dump");
    ok(&mut pgstack(&[
        "backup",
        "--database-url",
        src.url(),
        "--output",
        dump.to_str().unwrap(),
    ]));
    src.client()
        .await
        .unwrap()
        .batch_execute(&format!("DROP TABLE haunted; DROP ROLE {role};"))
        .await
        .unwrap();

    // Into a new database: the database is dropped again.
    let copy = format!("{}_failed", src.name());
    let out = fails(
        &mut pgstack(&[
            "restore",
            dump.to_str().unwrap(),
            "--into",
            &copy,
            "--create",
            "--keep-owners",
            "--database-url",
            src.url(),
        ]),
        1,
    );
    let err = stderr(&out);
    assert!(
        err.contains(&format!("role \"{role}\" does not exist")),
        "{err}"
    );
    assert!(err.contains("nothing of it was applied"), "{err}");
    assert!(err.contains("dropped again"), "{err}");
    assert!(!database_exists(&src, &copy).await);

    // Over an existing database: one transaction, so it is as it was.
    let plain = target(false).await;
    fails(
        &mut pgstack(&[
            "restore",
            dump.to_str().unwrap(),
            "--keep-owners",
            "--database-url",
            plain.url(),
        ]),
        1,
    );
    assert!(!has_table(plain.url(), "users").await);
    assert_eq!(keepsake(&plain).await, vec![42]);

    // Without --keep-owners the same dump restores.
    ok(&mut pgstack(&[
        "restore",
        dump.to_str().unwrap(),
        "--database-url",
        plain.url(),
    ]));
    assert!(has_table(plain.url(), "haunted").await);
}

#[tokio::test]
async fn bad_files_and_targets_are_refused_with_what_to_do() {
    let src = source().await;
    let dir = tempfile::tempdir().unwrap();

    let not_a_dump = dir.path().join("notes.txt");
    std::fs::write(&not_a_dump, "hello").unwrap();
    let out = fails(
        &mut pgstack(&[
            "restore",
            not_a_dump.to_str().unwrap(),
            "--database-url",
            src.url(),
        ]),
        1,
    );
    assert!(
        stderr(&out).contains("is not a dump pg_restore"),
        "{}",
        explain(&out)
    );
    let missing = dir.path().join("missing.dump");
    let out = fails(
        &mut pgstack(&[
            "restore",
            missing.to_str().unwrap(),
            "--database-url",
            src.url(),
        ]),
        1,
    );
    assert!(stderr(&out).contains("does not exist"), "{}", explain(&out));

    let dump = dir.path().join("src.dump");
    ok(&mut pgstack(&[
        "backup",
        "--database-url",
        src.url(),
        "--output",
        dump.to_str().unwrap(),
    ]));
    let before = std::fs::read(&dump).unwrap();
    let out = fails(
        &mut pgstack(&[
            "backup",
            "--database-url",
            src.url(),
            "--output",
            dump.to_str().unwrap(),
        ]),
        1,
    );
    assert!(stderr(&out).contains("already exists"), "{}", explain(&out));
    assert_eq!(std::fs::read(&dump).unwrap(), before);

    let out = fails(
        &mut pgstack(&[
            "restore",
            dump.to_str().unwrap(),
            "--into",
            "no_such_database_here",
            "--database-url",
            src.url(),
        ]),
        1,
    );
    assert!(stderr(&out).contains("add --create"), "{}", explain(&out));
    let out = fails(
        &mut pgstack(&[
            "restore",
            dump.to_str().unwrap(),
            "--into",
            "postgres",
            "--database-url",
            src.url(),
        ]),
        1,
    );
    assert!(
        stderr(&out).contains("the server itself needs it"),
        "{}",
        explain(&out)
    );

    // A backup of a database that is not there fails, and leaves no file.
    let gone = dir.path().join("gone.dump");
    let out = fails(
        &mut pgstack(&[
            "backup",
            "--database-url",
            &url_of(src.url(), "no_such_database_here"),
            "--output",
            gone.to_str().unwrap(),
        ]),
        1,
    );
    assert!(
        stderr(&out).contains("no_such_database_here"),
        "{}",
        explain(&out)
    );
    assert!(!gone.exists());
    assert!(!dir.path().join("gone.dump.partial").exists());
}

#[tokio::test]
async fn the_default_backup_goes_to_the_projects_target_backups() {
    let src = source().await;
    // A project folder of its own (its pgstack.toml marks it); CARGO_TARGET_DIR,
    // which several projects may share, is not where backups go.
    let project = tempfile::tempdir().unwrap();
    std::fs::write(project.path().join("pgstack.toml"), "[default]\n").unwrap();
    std::fs::create_dir(project.path().join("src")).unwrap();
    let shared_target = tempfile::tempdir().unwrap();
    let out = ok(pgstack(&["backup", "--database-url", src.url()])
        .current_dir(project.path().join("src"))
        .env("CARGO_TARGET_DIR", shared_target.path()));
    assert_eq!(
        std::fs::read_dir(shared_target.path()).unwrap().count(),
        0,
        "wrote into CARGO_TARGET_DIR"
    );
    let files: Vec<PathBuf> = std::fs::read_dir(project.path().join("target/backups"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with(&format!("{}-", src.name())) && name.ends_with("Z.dump"),
        "{name}"
    );
    assert!(
        stdout(&out).contains(&files[0].display().to_string()),
        "{}",
        explain(&out)
    );
}

#[tokio::test]
async fn the_password_never_shows_in_any_output() {
    let src = source().await;
    let password = "s3cret-Pw-9";
    // The kit's servers trust local connections: the password is accepted and ignored.
    let url = with_password(src.url(), password);
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("src.dump");
    let copy = format!("{}_pw", src.name());
    let runs = [
        pgstack(&[
            "backup",
            "--database-url",
            &url,
            "--output",
            dump.to_str().unwrap(),
            "--verbose",
        ])
        .output()
        .unwrap(),
        pgstack(&[
            "restore",
            dump.to_str().unwrap(),
            "--database-url",
            &url,
            "--into",
            &copy,
            "--create",
            "--verbose",
            "--json",
        ])
        .output()
        .unwrap(),
        pgstack(&[
            "restore",
            dump.to_str().unwrap(),
            "--database-url",
            &url,
            "--into",
            &copy,
            "--dry-run",
        ])
        .output()
        .unwrap(),
        pgstack(&[
            "restore",
            dump.to_str().unwrap(),
            "--database-url",
            &url,
            "--into",
            "missing_db",
        ])
        .output()
        .unwrap(),
        pgstack(&[
            "backup",
            "--database-url",
            &format!("postgres://postgres:{password}@127.0.0.1:1/nowhere"),
            "--output",
            dir.path().join("nowhere.dump").to_str().unwrap(),
        ])
        .output()
        .unwrap(),
    ];
    for (i, out) in runs.iter().enumerate() {
        let all = explain(out);
        assert!(
            !all.contains(password),
            "run {i} printed the password: {all}"
        );
    }
    assert!(runs[0].status.success(), "{}", explain(&runs[0]));
    assert!(runs[1].status.success(), "{}", explain(&runs[1]));
    assert!(runs[2].status.success(), "{}", explain(&runs[2]));
    assert_eq!(runs[3].status.code(), Some(1), "{}", explain(&runs[3]));
    assert_eq!(runs[4].status.code(), Some(1), "{}", explain(&runs[4]));
    // --verbose passed pg_dump's own lines through.
    assert!(
        stderr(&runs[0]).contains("pg_dump: dumping contents of table"),
        "{}",
        explain(&runs[0])
    );
    assert_eq!(
        contents(&url_of(src.url(), &copy)).await,
        contents(src.url()).await
    );
    drop_database(&src, &copy).await;
}

/// A folder the kit accepts as PostgreSQL's binaries, whose `pg_dump` only
/// records how it was called (arguments and environment) and reports `version`.
fn stub_bindir(version: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for tool in ["initdb", "pg_ctl", "postgres"] {
        let path = dir.path().join(tool);
        std::fs::write(&path, "#!/bin/sh\nexit 1\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let script = format!(
        r#"#!/bin/sh
if [ "$1" = "--version" ]; then echo "pg_dump (PostgreSQL) {version}"; exit 0; fi
printf '%s\n' "$@" > "$STUB_RECORD.args"
env > "$STUB_RECORD.env"
out=""
while [ $# -gt 0 ]; do
  if [ "$1" = "--file" ]; then out="$2"; fi
  shift
done
echo "pg_dump: dumping contents of table \"public.users\"" >&2
printf 'PGDMP' > "$out"
"#
    );
    let path = dir.path().join("pg_dump");
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

#[tokio::test]
async fn pg_dump_gets_the_password_in_its_environment_only() {
    let src = TestDb::new().await.unwrap();
    let password = "s3cret-Pw-7";
    let url = with_password(src.url(), password);
    let bindir = stub_bindir("99.1");
    let record = tempfile::tempdir().unwrap();
    let record_base = record.path().join("call");
    let dump = record.path().join("out.dump");

    ok(pgstack(&[
        "backup",
        "--database-url",
        &url,
        "--output",
        dump.to_str().unwrap(),
    ])
    .env("PGSTACK_PG_BINDIR", bindir.path())
    .env("STUB_RECORD", &record_base)
    // A caller's libpq variable must not reach the tool.
    .env("PGSERVICE", "callers-service"));

    let args = std::fs::read_to_string(record_base.with_extension("args")).unwrap();
    let env = std::fs::read_to_string(record_base.with_extension("env")).unwrap();
    assert!(
        !args.contains(password),
        "the password was on the command line: {args}"
    );
    assert!(args.contains("--format=custom"), "{args}");
    assert!(
        args.lines().any(|l| l.starts_with("--lock-wait-timeout=")),
        "{args}"
    );
    assert!(
        env.lines().any(|l| l == format!("PGPASSWORD={password}")),
        "{env}"
    );
    assert!(
        env.lines()
            .any(|l| l == format!("PGDATABASE={}", src.name())),
        "{env}"
    );
    assert!(env.lines().any(|l| l == "PGSSLMODE=disable"), "{env}");
    assert!(!env.contains("callers-service"), "{env}");
    assert_eq!(std::fs::read(&dump).unwrap(), b"PGDMP");
}

#[tokio::test]
async fn a_pg_dump_older_than_the_server_is_refused() {
    let src = TestDb::new().await.unwrap();
    let bindir = stub_bindir("9.6.24");
    let record = tempfile::tempdir().unwrap();
    let dump = record.path().join("out.dump");
    let out = fails(
        pgstack(&[
            "backup",
            "--database-url",
            src.url(),
            "--output",
            dump.to_str().unwrap(),
        ])
        .env("PGSTACK_PG_BINDIR", bindir.path())
        .env("STUB_RECORD", record.path().join("call")),
        1,
    );
    let err = stderr(&out);
    assert!(
        err.contains("is version 9.6.24, older than the server"),
        "{err}"
    );
    assert!(err.contains("PGSTACK_PG_BINDIR"), "{err}");
    assert!(!dump.exists());
    assert!(
        !record.path().join("call.args").exists(),
        "pg_dump ran although it is too old"
    );
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        vec!["restore"],
        vec!["restore", "x.dump", "--into"],
        vec!["restore", "x.dump", "--bogus"],
        vec!["backup", "--output"],
        vec!["backup", "extra"],
        vec!["backup", "--timeout", "forever"],
    ] {
        let out = pgstack(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", explain(&out));
        assert!(out.stdout.is_empty(), "{args:?}: {}", explain(&out));
        assert!(
            stderr(&out).starts_with("error:"),
            "{args:?}: {}",
            explain(&out)
        );
    }
}
