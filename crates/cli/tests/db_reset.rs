//! `pgstack db-reset`, run as the real binary against real servers: it
//! resets and migrates, seeds in one transaction, and refuses — changing
//! nothing — for production, non-local hosts and databases marked production.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;

use pgstack_tests::TestDb;

/// The reference schema's migration count.
fn migration_count() -> i64 {
    std::fs::read_dir(root().join("migrations"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".up.sql")
        })
        .count() as i64
}

async fn has_table(db: &TestDb, table: &str) -> bool {
    let client = db.client().await.unwrap();
    client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await
        .unwrap()
        .get(0)
}

async fn with_junk(db: &TestDb) {
    let client = db.client().await.unwrap();
    client
        .batch_execute("CREATE TABLE junk (id int); INSERT INTO junk VALUES (1);")
        .await
        .unwrap();
}

#[tokio::test]
async fn resets_migrates_and_records_the_environment() {
    let db = TestDb::new().await.unwrap();
    with_junk(&db).await;

    let out = pgstack(&["db-reset", "--database-url", db.url()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", explain(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains(&format!("applied {} migration(s)", migration_count())),
        "{}",
        explain(&out)
    );

    assert!(
        !has_table(&db, "junk").await,
        "the old schema survived the reset"
    );
    let client = db.client().await.unwrap();
    let applied: i64 = client
        .query_one("SELECT count(*) FROM _sqlx_migrations WHERE success", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(applied, migration_count());
    let env: String = client
        .query_one(
            "SELECT value FROM pgstack_metadata WHERE key = 'environment'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(env, "development");
}

#[tokio::test]
async fn dry_run_prints_the_plan_and_changes_nothing() {
    let db = TestDb::new().await.unwrap();
    with_junk(&db).await;

    let out = pgstack(&["db-reset", "--dry-run", "--database-url", db.url()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", explain(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("drop the database `{}`", db.name())),
        "{text}"
    );
    assert!(
        text.contains(&format!("apply {} migration(s)", migration_count())),
        "{text}"
    );
    assert!(
        has_table(&db, "junk").await,
        "--dry-run changed the database"
    );
    assert!(!has_table(&db, "_sqlx_migrations").await);
}

#[tokio::test]
async fn production_environment_is_refused() {
    let db = TestDb::new().await.unwrap();
    with_junk(&db).await;

    let out = pgstack(&["db-reset", "--database-url", db.url()])
        .env("APP_ENV", "production")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", explain(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nothing was changed"), "{err}");
    assert!(err.contains("the environment is production"), "{err}");
    assert!(
        err.contains(&format!("--confirm-destroy {}", db.name())),
        "{err}"
    );
    assert!(
        has_table(&db, "junk").await,
        "a refused reset changed the database"
    );
}

#[tokio::test]
async fn a_database_marked_production_is_refused_until_confirmed_by_name() {
    let db = TestDb::new().await.unwrap();
    with_junk(&db).await;
    db.client()
        .await
        .unwrap()
        .batch_execute(
            "CREATE TABLE pgstack_metadata (key text PRIMARY KEY, value text NOT NULL, updated_at timestamptz NOT NULL DEFAULT now());
             INSERT INTO pgstack_metadata (key, value) VALUES ('environment', 'production');",
        )
        .await
        .unwrap();

    let out = pgstack(&["db-reset", "--database-url", db.url()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", explain(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("records that it is a production database"),
        "{err}"
    );
    assert!(
        has_table(&db, "junk").await,
        "a refused reset changed the database"
    );

    // A confirmation that names another database changes nothing either.
    let out = pgstack(&[
        "db-reset",
        "--database-url",
        db.url(),
        "--confirm-destroy",
        "some_other_db",
    ])
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", explain(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--confirm-destroy names `some_other_db`"),
        "{}",
        explain(&out)
    );
    assert!(has_table(&db, "junk").await);

    let out = pgstack(&[
        "db-reset",
        "--database-url",
        db.url(),
        "--confirm-destroy",
        db.name(),
    ])
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", explain(&out));
    assert!(!has_table(&db, "junk").await);
}

#[test]
fn a_remote_host_is_refused_before_any_connection_and_the_password_never_shows() {
    let out = pgstack(&[
        "db-reset",
        "--database-url",
        "postgres://app:s3cret-pw@db.example.invalid:5432/app",
    ])
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", explain(&out));
    let all = explain(&out);
    assert!(
        all.contains("the host `db.example.invalid` is not local"),
        "{all}"
    );
    assert!(all.contains("--confirm-destroy app"), "{all}");
    assert!(!all.contains("s3cret-pw"), "the password leaked: {all}");
}

#[tokio::test]
async fn the_seed_loads_in_one_transaction_or_not_at_all() {
    let db = TestDb::new().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("seed.sql");
    std::fs::write(
        &good,
        "INSERT INTO users (email, display_name) VALUES ('ada@example.org', 'Ada');\n\
         INSERT INTO users (email, display_name) VALUES ('grace@example.org', 'Grace');\n",
    )
    .unwrap();
    let out = pgstack(&[
        "db-reset",
        "--database-url",
        db.url(),
        "--seed",
        good.to_str().unwrap(),
    ])
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", explain(&out));
    let users: i64 = db
        .client()
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(users, 2);

    // The second statement breaks a constraint: the first must not stay behind.
    let bad = dir.path().join("bad.sql");
    std::fs::write(
        &bad,
        "INSERT INTO users (email, display_name) VALUES ('linus@example.org', 'Linus');\n\
         INSERT INTO users (email, display_name) VALUES ('not-an-address', 'Nobody');\n",
    )
    .unwrap();
    let out = pgstack(&[
        "db-reset",
        "--database-url",
        db.url(),
        "--seed",
        bad.to_str().unwrap(),
    ])
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", explain(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bad.sql"),
        "{}",
        explain(&out)
    );
    let users: i64 = db
        .client()
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(users, 0, "a failed seed left rows behind");
}

#[test]
fn with_no_database_url_it_prepares_the_local_development_cluster() {
    let dev = DevDir::new("pgstack-db-reset-");
    let dir = dev.path();

    let out = pgstack(&["db-reset"])
        .env("PGSTACK_DEV_DIR", dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", explain(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("applied {} migration(s)", migration_count())),
        "{text}"
    );
    assert!(
        text.contains("export DATABASE_URL=postgres://postgres@127.0.0.1:"),
        "{text}"
    );

    // Twice in a row is fine: the server is reused and the database recreated.
    let out = pgstack(&["db-reset"])
        .env("PGSTACK_DEV_DIR", dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", explain(&out));
}
