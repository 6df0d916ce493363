//! The migrator against a real PostgreSQL server (the test kit's `TestDb`).

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{applied_versions, exists, migrator, node, reference_dir, schema_dump, write};
use pgstack_config::{Environment, NodeSettings};
use pgstack_migrations::{
    Direction, DownTarget, Error, Event, MigrationState, Migrations, Migrator, Operation, UpTarget,
};
use pgstack_tests::TestDb;

#[tokio::test]
async fn reference_schema_up_down_up_is_identical() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let m = migrator(&reference_dir(), &db);
    let total = m.migrations().len();
    assert!(
        total >= 5,
        "the reference schema has users, sponsors, bills, bill_sponsors, metadata"
    );

    let first = m.up(UpTarget::Latest).await?;
    assert_eq!(first.steps.len(), total);
    assert!(m.status().await?.is_up_to_date());
    let dump_first = schema_dump(&db).await?;
    for table in [
        "users",
        "sponsors",
        "bills",
        "bill_sponsors",
        "pgstack_metadata",
    ] {
        assert!(
            dump_first.contains(&format!("CREATE TABLE public.{table} ")),
            "{table} missing"
        );
    }

    let down = m.down(DownTarget::Version(0)).await?;
    assert_eq!(down.steps.len(), total);
    assert!(down.steps.iter().all(|s| s.direction == Direction::Down));
    assert_eq!(
        down.steps.iter().map(|s| s.version).collect::<Vec<_>>(),
        (1..=total as i64).rev().collect::<Vec<_>>(),
        "newest first"
    );
    assert!(applied_versions(&db).await?.is_empty());
    let client = db.client().await?;
    let leftovers: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = 'public' AND c.relname <> '_sqlx_migrations' \
               AND c.relname NOT LIKE '_sqlx_migrations%'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(leftovers, 0, "down to zero leaves no relation behind");
    let types: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace \
             WHERE n.nspname = 'public' AND t.typtype = 'e'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(types, 0, "down to zero drops the enum types");

    m.up(UpTarget::Latest).await?;
    let dump_second = schema_dump(&db).await?;
    assert_eq!(dump_first, dump_second);
    Ok(())
}

#[tokio::test]
async fn the_reference_schema_enforces_its_rules() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    migrator(&reference_dir(), &db).up(UpTarget::Latest).await?;
    let c = db.client().await?;
    c.batch_execute(
        "INSERT INTO users (email, display_name) VALUES ('ann@example.org', 'Ann');
         INSERT INTO sponsors (full_name, party, state, chamber, district) VALUES ('Rep A', 'I', 'VT', 'house', 0);
         INSERT INTO sponsors (full_name, party, state, chamber) VALUES ('Sen B', 'D', 'VT', 'senate');
         INSERT INTO bills (session, number, title, introduced_on) VALUES (118, 'H.R. 1', 'A bill', '2023-01-09');
         INSERT INTO bill_sponsors (bill_id, sponsor_id, is_primary) VALUES (1, 1, true), (1, 2, false);",
    )
    .await?;
    // each of these breaks one rule
    for bad in [
        "INSERT INTO users (email, display_name) VALUES ('ANN@example.org', 'Other')",
        "INSERT INTO users (email, display_name) VALUES ('not-an-email', 'X')",
        "INSERT INTO sponsors (full_name, state, chamber) VALUES ('Sen C', 'vt', 'senate')",
        "INSERT INTO sponsors (full_name, state, chamber, district) VALUES ('Sen D', 'VT', 'senate', 1)",
        "INSERT INTO bills (session, number, title, introduced_on) VALUES (118, 'H.R. 1', 'dup', '2023-01-10')",
        "INSERT INTO bills (session, number, title, introduced_on, status) VALUES (118, 'H.R. 2', 't', '2023-01-10', 'lost')",
        "UPDATE bill_sponsors SET is_primary = true WHERE sponsor_id = 2",
        "INSERT INTO bill_sponsors (bill_id, sponsor_id) VALUES (99, 1)",
        "DELETE FROM sponsors WHERE id = 1",
    ] {
        assert!(c.batch_execute(bad).await.is_err(), "accepted: {bad}");
    }
    // deleting a bill removes its sponsorships; deleting a user keeps the bill
    c.batch_execute("DELETE FROM users; DELETE FROM bills;")
        .await?;
    let left: i64 = c
        .query_one("SELECT count(*) FROM bill_sponsors", &[])
        .await?
        .get(0);
    assert_eq!(left, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_migrators_at_once_apply_each_migration_once() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let dir = tempfile::tempdir()?;
    // A log that counts every execution, slow migrations so the others must
    // wait, and a CREATE INDEX CONCURRENTLY, which would deadlock against a
    // migrator blocked inside pg_advisory_lock.
    let mut files = vec![(
        "0001_log.up.sql".to_owned(),
        "CREATE TABLE run_log (version int NOT NULL);\nINSERT INTO run_log VALUES (1);\n"
            .to_owned(),
    )];
    for v in 2..=6 {
        files.push((
            format!("{v:04}_step.up.sql"),
            format!("SELECT pg_sleep(0.05);\nINSERT INTO run_log VALUES ({v});\n"),
        ));
    }
    files.push((
        "0007_index.up.sql".to_owned(),
        "-- no-transaction\nCREATE INDEX CONCURRENTLY run_log_version_idx ON run_log (version);\n"
            .to_owned(),
    ));
    for (name, sql) in &files {
        std::fs::write(dir.path().join(name), sql)?;
    }
    let migrations = Migrations::from_dir(dir.path())?;
    let events: Arc<Mutex<Vec<Event>>> = Arc::default();
    let barrier = Arc::new(tokio::sync::Barrier::new(8));
    let mut tasks = Vec::new();
    for i in 0..8 {
        let events = Arc::clone(&events);
        let m = Migrator::new(migrations.clone(), &node(&db))
            .application_name(&format!("migrator-{i}"))
            .lock_timeout(Duration::from_secs(60))
            .on_progress(move |e| events.lock().unwrap().push(e.clone()));
        let barrier = Arc::clone(&barrier);
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            m.up(UpTarget::Latest).await
        }));
    }
    let mut applied = 0;
    for t in tasks {
        let report = t
            .await?
            .map_err(|e| anyhow::anyhow!("a migrator failed: {e}"))?;
        applied += report.steps.len();
    }
    assert_eq!(
        applied, 7,
        "every migration applied by exactly one migrator"
    );
    let c = db.client().await?;
    let counts = c
        .query(
            "SELECT version, count(*) FROM run_log GROUP BY version ORDER BY version",
            &[],
        )
        .await?;
    assert_eq!(counts.len(), 6);
    for row in counts {
        assert_eq!(
            row.get::<_, i64>(1),
            1,
            "version {} ran more than once",
            row.get::<_, i32>(0)
        );
    }
    assert_eq!(applied_versions(&db).await?, (1..=7).collect::<Vec<_>>());
    let valid: bool = c
        .query_one(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = 'run_log_version_idx'::regclass",
            &[],
        )
        .await?
        .get(0);
    assert!(valid);
    // the waiters said who held the lock
    let events = events.lock().unwrap();
    let named: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::LockWaiting {
                holder: Some(h), ..
            } => Some(h.clone()),
            _ => None,
        })
        .collect();
    assert!(
        !named.is_empty(),
        "no waiter reported the lock holder: {events:?}"
    );
    assert!(
        named
            .iter()
            .all(|h| h.application_name.starts_with("migrator-") && h.pid > 0)
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, Event::LockAcquired { .. }))
            .count(),
        8
    );
    Ok(())
}

#[tokio::test]
async fn lock_timeout_names_the_holder_and_uses_sqlx_lock_key() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    // Hold sqlx's migration lock (0x3d32ad9e * crc32(database name)) from
    // another session, as sqlx-cli would.
    const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);
    let key = 0x3d32ad9e_i64 * i64::from(CRC.checksum(db.name().as_bytes()));
    let holder = db.client().await?;
    holder
        .batch_execute("SET application_name = 'sqlx-cli-lookalike'")
        .await?;
    holder
        .execute("SELECT pg_advisory_lock($1)", &[&key])
        .await?;
    let holder_pid: i32 = holder
        .query_one("SELECT pg_backend_pid()", &[])
        .await?
        .get(0);

    let waiting = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&waiting);
    let m = migrator(&reference_dir(), &db)
        .lock_timeout(Duration::from_millis(400))
        .on_progress(move |e| {
            if let Event::LockWaiting { holder, .. } = e {
                seen.lock().unwrap().push(holder.clone());
            }
        });
    let err = m.up(UpTarget::Latest).await.unwrap_err();
    match &err {
        Error::LockTimeout {
            waited,
            holder: Some(h),
        } => {
            assert!(*waited >= Duration::from_millis(400));
            assert_eq!(h.pid, holder_pid);
            assert_eq!(h.application_name, "sqlx-cli-lookalike");
            assert!(h.session_start.is_some());
        }
        other => panic!("expected a lock timeout naming the holder, got {other:?}"),
    }
    let text = err.to_string();
    assert!(
        text.contains("sqlx-cli-lookalike") && text.contains("lock_timeout"),
        "{text}"
    );
    assert!(!text.contains("postgres://"), "{text}");
    let waits = waiting.lock().unwrap().clone();
    assert!(
        matches!(waits.first(), Some(Some(h)) if h.pid == holder_pid),
        "{waits:?}"
    );
    assert!(
        applied_versions(&db).await?.is_empty(),
        "nothing ran without the lock"
    );

    // once released, the same migrator proceeds
    holder
        .execute("SELECT pg_advisory_unlock($1)", &[&key])
        .await?;
    assert_eq!(
        m.up(UpTarget::Latest).await?.steps.len(),
        m.migrations().len()
    );
    Ok(())
}

#[tokio::test]
async fn edited_migration_is_reported_and_refused_but_crlf_is_not() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let dir = tempfile::tempdir()?;
    let one = "CREATE TABLE a (id int);\n";
    let two = "CREATE TABLE b (id int);\n-- a comment\n";
    write(
        dir.path(),
        &[("0001_a.up.sql", one), ("0002_b.up.sql", two)],
    );
    migrator(dir.path(), &db).up(UpTarget::Latest).await?;

    // a CRLF checkout of the same files is fine
    write(dir.path(), &[("0002_b.up.sql", &two.replace('\n', "\r\n"))]);
    let m = migrator(dir.path(), &db);
    assert!(m.validate().await?.is_ok());
    assert!(m.status().await?.is_up_to_date());
    assert!(m.up(UpTarget::Latest).await?.steps.is_empty());

    // an edit (even of a comment) is not
    write(
        dir.path(),
        &[(
            "0002_b.up.sql",
            "CREATE TABLE b (id int);\n-- an edited comment\n",
        )],
    );
    write(
        dir.path(),
        &[("0003_c.up.sql", "CREATE TABLE c (id int);\n")],
    );
    let m = migrator(dir.path(), &db);
    let report = m.validate().await?;
    assert!(!report.is_ok());
    assert_eq!(report.problems.len(), 1);
    assert_eq!(report.problems[0].version, 2);
    assert_eq!(report.problems[0].state, MigrationState::ChecksumMismatch);
    let err = report.into_result().unwrap_err();
    assert!(matches!(err, Error::Invalid(_)));
    assert!(err.to_string().contains("0002_b.up.sql"), "{err}");

    let err = m.up(UpTarget::Latest).await.unwrap_err();
    assert!(
        matches!(err, Error::ChecksumMismatch { version: 2, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("0002_b.up.sql"), "{err}");
    assert!(
        !exists(&db, "c").await?,
        "up refused before running anything"
    );
    assert_eq!(applied_versions(&db).await?, vec![1, 2]);
    Ok(())
}

#[tokio::test]
async fn a_database_applied_from_a_crlf_checkout_validates_against_lf_files() -> anyhow::Result<()>
{
    let db = TestDb::new().await?;
    let crlf_dir = tempfile::tempdir()?;
    let lf = "CREATE TABLE a (\n    id int\n);\n";
    write(
        crlf_dir.path(),
        &[("0001_a.up.sql", &lf.replace('\n', "\r\n"))],
    );
    // sqlx itself records the checksum of the CRLF bytes
    let sqlx_migrator = sqlx::migrate::Migrator::new(crlf_dir.path()).await?;
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(db.url()).await?;
    sqlx_migrator.run(&mut conn).await?;

    let lf_dir = tempfile::tempdir()?;
    write(lf_dir.path(), &[("0001_a.up.sql", lf)]);
    let m = migrator(lf_dir.path(), &db);
    assert!(m.validate().await?.is_ok());
    assert!(m.up(UpTarget::Latest).await?.steps.is_empty());
    Ok(())
}

#[tokio::test]
async fn a_syntax_error_on_line_7_is_reported_at_line_7_and_leaves_no_trace() -> anyhow::Result<()>
{
    let db = TestDb::new().await?;
    let dir = tempfile::tempdir()?;
    let bad = "\
-- line 1: bills get a new table
CREATE TABLE notes (
    id int PRIMARY KEY,
    body text NOT NULL
);
INSERT INTO notes VALUES (1, 'x');
CREATE TABLEE broken (id int);
";
    write(
        dir.path(),
        &[
            ("0001_ok.up.sql", "CREATE TABLE ok (id int);\n"),
            ("0002_notes.up.sql", bad),
        ],
    );
    let changed: Arc<Mutex<Vec<i64>>> = Arc::default();
    let seen = Arc::clone(&changed);
    let m = migrator(dir.path(), &db)
        .after_schema_change(move |v| seen.lock().unwrap().extend_from_slice(v));
    let err = m.up(UpTarget::Latest).await.unwrap_err();
    let Error::MigrationFailed(failure) = &err else {
        panic!("expected a migration failure, got {err:?}")
    };
    assert_eq!(failure.version, 2);
    assert_eq!(failure.line, Some(7));
    assert_eq!(failure.code.as_deref(), Some("42601"));
    assert!(failure.file.ends_with("0002_notes.up.sql"));
    assert!(!failure.dirty);
    let text = err.to_string();
    assert!(text.contains("0002_notes.up.sql, line 7"), "{text}");
    assert!(text.contains("rolled back"), "{text}");
    assert!(
        exists(&db, "ok").await?,
        "the migration before it stays applied"
    );
    assert!(
        !exists(&db, "notes").await?,
        "nothing of the failed migration remains"
    );
    assert_eq!(applied_versions(&db).await?, vec![1]);
    assert_eq!(
        *changed.lock().unwrap(),
        vec![1],
        "the hook hears of the migration applied before the failure"
    );
    assert_eq!(
        m.status().await?.in_state(MigrationState::Pending).count(),
        1
    );
    Ok(())
}

#[tokio::test]
async fn a_runtime_error_is_located_and_rolled_back() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let dir = tempfile::tempdir()?;
    let bad = "CREATE TABLE first (id int);\n\nINSERT INTO first VALUES (1);\n\nINSERT INTO missing_table VALUES (1);\n";
    write(dir.path(), &[("0001_x.up.sql", bad)]);
    let err = migrator(dir.path(), &db)
        .up(UpTarget::Latest)
        .await
        .unwrap_err();
    let Error::MigrationFailed(failure) = &err else {
        panic!("{err:?}")
    };
    assert_eq!(failure.line, Some(5), "{err}");
    assert_eq!(failure.code.as_deref(), Some("42P01"));
    assert!(
        !exists(&db, "first").await?,
        "the statements before the failure were rolled back"
    );
    assert!(applied_versions(&db).await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn no_transaction_migrations_run_outside_a_transaction() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let dir = tempfile::tempdir()?;
    write(
        dir.path(),
        &[
            (
                "0001_t.up.sql",
                "CREATE TABLE t (x int);\nINSERT INTO t SELECT g FROM generate_series(1, 1000) g;\n",
            ),
            ("0001_t.down.sql", "DROP TABLE t;\n"),
            (
                "0002_idx.up.sql",
                "-- no-transaction\nCREATE INDEX CONCURRENTLY t_x_idx ON t (x);\n",
            ),
            (
                "0002_idx.down.sql",
                "-- no-transaction\nDROP INDEX CONCURRENTLY t_x_idx;\n",
            ),
        ],
    );
    let m = migrator(dir.path(), &db);
    let plan = m.plan(Operation::Up(UpTarget::Latest)).await?;
    assert!(plan.steps[1].no_transaction);
    assert_eq!(m.up(UpTarget::Latest).await?.steps.len(), 2);
    assert!(exists(&db, "t_x_idx").await?);
    m.down(DownTarget::Steps(1)).await?;
    assert!(!exists(&db, "t_x_idx").await?);
    assert_eq!(applied_versions(&db).await?, vec![1]);

    // the same file without the marker fails inside the transaction, cleanly
    let db = TestDb::new().await?;
    let tx_dir = tempfile::tempdir()?;
    write(
        tx_dir.path(),
        &[
            ("0001_t.up.sql", "CREATE TABLE t (x int);\n"),
            (
                "0002_idx.up.sql",
                "CREATE INDEX CONCURRENTLY t_x_idx ON t (x);\n",
            ),
        ],
    );
    let err = migrator(tx_dir.path(), &db)
        .up(UpTarget::Latest)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::MigrationFailed(f) if f.code.as_deref() == Some("25001")),
        "{err}"
    );
    assert!(!exists(&db, "t_x_idx").await?);
    assert_eq!(applied_versions(&db).await?, vec![1]);
    Ok(())
}

#[tokio::test]
async fn a_failed_no_transaction_migration_marks_the_database_dirty() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let dir = tempfile::tempdir()?;
    write(
        dir.path(),
        &[
            (
                "0001_t.up.sql",
                "CREATE TABLE t (x int);\nINSERT INTO t VALUES (1), (1);\n",
            ),
            // duplicates: the build fails and leaves an INVALID index behind
            (
                "0002_idx.up.sql",
                "-- no-transaction\nCREATE UNIQUE INDEX CONCURRENTLY t_x_key ON t (x);\n",
            ),
        ],
    );
    let m = migrator(dir.path(), &db);
    let err = m.up(UpTarget::Latest).await.unwrap_err();
    let Error::MigrationFailed(failure) = &err else {
        panic!("{err:?}")
    };
    assert!(failure.dirty && failure.no_transaction);
    assert!(err.to_string().contains("forget-failed 2"), "{err}");

    let status = m.status().await?;
    assert_eq!(
        status
            .in_state(MigrationState::Failed)
            .map(|e| e.version)
            .collect::<Vec<_>>(),
        vec![2]
    );
    assert!(!m.validate().await?.is_ok());
    let err = m.up(UpTarget::Latest).await.unwrap_err();
    assert!(matches!(err, Error::Dirty { version: 2, .. }), "{err}");
    assert!(
        err.to_string().contains("DELETE FROM _sqlx_migrations"),
        "{err}"
    );
    // sqlx agrees that the database is dirty
    let sqlx_migrator = sqlx::migrate::Migrator::new(dir.path()).await?;
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(db.url()).await?;
    assert!(matches!(
        sqlx_migrator.run(&mut conn).await,
        Err(sqlx::migrate::MigrateError::Dirty(2))
    ));
    // sqlx returns without releasing its lock; only closing the session frees it
    sqlx::Connection::close(conn).await?;

    // repair by hand, clear the mark, go on
    db.client()
        .await?
        .batch_execute("DROP INDEX t_x_key; DELETE FROM t WHERE ctid = (SELECT min(ctid) FROM t);")
        .await?;
    assert!(m.forget_failed(2).await?);
    assert!(!m.forget_failed(2).await?);
    assert_eq!(m.up(UpTarget::Latest).await?.steps.len(), 1);
    assert!(m.status().await?.is_up_to_date());
    Ok(())
}

#[tokio::test]
async fn baseline_lets_up_skip_what_exists() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let migrations = Migrations::from_dir(reference_dir())?;
    // an existing database: the first three migrations' schema made by hand
    let c = db.client().await?;
    for v in 1..=3 {
        c.batch_execute(migrations.get(v).unwrap().up().sql())
            .await?;
    }
    let m = Migrator::new(migrations.clone(), &node(&db));
    let err = m.baseline(99).await.unwrap_err();
    assert!(
        matches!(err, Error::UnknownVersion { version: 99, .. }),
        "{err}"
    );

    let report = m.baseline(3).await?;
    assert_eq!(report.baselined, vec![1, 2, 3]);
    assert!(report.steps.is_empty());
    let status = m.status().await?;
    assert_eq!(status.in_state(MigrationState::Applied).count(), 3);
    assert_eq!(status.current_version(), Some(3));
    // running again records nothing new
    assert!(m.baseline(3).await?.baselined.is_empty());

    let up = m.up(UpTarget::Latest).await?;
    assert_eq!(
        up.changed_versions(),
        (4..=migrations.latest().unwrap()).collect::<Vec<_>>()
    );
    let times = c
        .query(
            "SELECT execution_time FROM _sqlx_migrations WHERE version <= 3",
            &[],
        )
        .await?;
    assert!(times.iter().all(|r| r.get::<_, i64>(0) == -1));
    Ok(())
}

/// Files in sqlx-cli's reversible layout (timestamp versions), as in sqlx-cli's
/// own `tests/migrations_reversible`.
fn sqlx_cli_folder(dir: &std::path::Path) {
    for (i, stamp) in [
        "20230101000000",
        "20230201000000",
        "20230301000000",
        "20230401000000",
        "20230501000000",
    ]
    .iter()
    .enumerate()
    {
        let n = i + 1;
        write(
            dir,
            &[
                (
                    &format!("{stamp}_test{n}.up.sql"),
                    &format!("CREATE TABLE test{n}(x INTEGER PRIMARY KEY);\n"),
                ),
                (
                    &format!("{stamp}_test{n}.down.sql"),
                    &format!("DROP TABLE test{n};\n"),
                ),
            ],
        );
    }
}

#[tokio::test]
async fn a_sqlx_cli_folder_applies_and_reverts() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let dir = tempfile::tempdir()?;
    sqlx_cli_folder(dir.path());
    let m = migrator(dir.path(), &db);
    assert_eq!(
        m.up(UpTarget::Version(20230301000000)).await?.steps.len(),
        3
    );
    assert!(exists(&db, "test3").await? && !exists(&db, "test4").await?);
    assert_eq!(m.up(UpTarget::Latest).await?.steps.len(), 2);
    let down = m.down(DownTarget::Steps(2)).await?;
    assert_eq!(
        down.changed_versions(),
        vec![20230501000000, 20230401000000]
    );
    m.down(DownTarget::Version(20230101000000)).await?;
    assert_eq!(applied_versions(&db).await?, vec![20230101000000]);
    assert!(exists(&db, "test1").await? && !exists(&db, "test2").await?);
    m.down(DownTarget::Version(0)).await?;
    assert!(!exists(&db, "test1").await?);
    Ok(())
}

#[tokio::test]
async fn sqlx_and_pgstack_see_each_others_work_as_applied() -> anyhow::Result<()> {
    // sqlx's Migrator first, then our status
    let db = TestDb::new().await?;
    let dir = tempfile::tempdir()?;
    sqlx_cli_folder(dir.path());
    let sqlx_migrator = sqlx::migrate::Migrator::new(dir.path()).await?;
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(db.url()).await?;
    sqlx_migrator.run(&mut conn).await?;
    let m = migrator(dir.path(), &db);
    let status = m.status().await?;
    assert!(status.is_up_to_date(), "{status}");
    assert_eq!(status.entries.len(), 5);
    assert!(m.up(UpTarget::Latest).await?.steps.is_empty());
    // and our down undoes what sqlx applied
    assert_eq!(m.down(DownTarget::Steps(1)).await?.steps.len(), 1);
    // sqlx re-applies the one we reverted, and nothing else
    sqlx_migrator.run(&mut conn).await?;
    assert_eq!(applied_versions(&db).await?.len(), 5);

    // ours first (reference schema), then sqlx's
    let db = TestDb::new().await?;
    let m = migrator(&reference_dir(), &db);
    m.up(UpTarget::Latest).await?;
    let sqlx_migrator = sqlx::migrate::Migrator::new(reference_dir()).await?;
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(db.url()).await?;
    sqlx_migrator.run(&mut conn).await?; // no VersionMismatch, nothing re-run
    assert_eq!(applied_versions(&db).await?.len(), m.migrations().len());
    sqlx_migrator.undo(&mut conn, 0).await?;
    assert!(applied_versions(&db).await?.is_empty());
    assert!(!exists(&db, "users").await?);
    Ok(())
}

#[tokio::test]
async fn a_missing_down_file_is_refused_before_anything_is_reverted() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let dir = tempfile::tempdir()?;
    write(
        dir.path(),
        &[
            ("0001_a.up.sql", "CREATE TABLE a (id int);\n"),
            ("0001_a.down.sql", "DROP TABLE a;\n"),
            ("0002_b.up.sql", "CREATE TABLE b (id int);\n"),
            ("0003_c.up.sql", "CREATE TABLE c (id int);\n"),
            ("0003_c.down.sql", "DROP TABLE c;\n"),
        ],
    );
    let m = migrator(dir.path(), &db);
    m.up(UpTarget::Latest).await?;
    let err = m.down(DownTarget::Version(0)).await.unwrap_err();
    match &err {
        Error::MissingDown {
            version: 2,
            expected,
            ..
        } => {
            assert!(expected.ends_with("0002_b.down.sql"), "{expected:?}")
        }
        other => panic!("expected a missing down file, got {other:?}"),
    }
    assert!(err.to_string().contains("0002_b.down.sql"), "{err}");
    assert_eq!(
        applied_versions(&db).await?,
        vec![1, 2, 3],
        "nothing was reverted"
    );
    let err = m
        .plan(Operation::Down(DownTarget::Version(0)))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::MissingDown { version: 2, .. }));
    // reverting only what has a down file works
    m.down(DownTarget::Steps(1)).await?;
    assert_eq!(applied_versions(&db).await?, vec![1, 2]);
    Ok(())
}

#[tokio::test]
async fn bad_folders_give_clear_errors() -> anyhow::Result<()> {
    let gap = tempfile::tempdir()?;
    write(
        gap.path(),
        &[
            ("0001_a.up.sql", "SELECT 1;"),
            ("0003_c.up.sql", "SELECT 1;"),
        ],
    );
    let err = Migrations::from_dir(gap.path()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Gap {
                before: 1,
                after: 3,
                missing: 2,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("0003_c.up.sql"), "{err}");

    let dup = tempfile::tempdir()?;
    write(
        dup.path(),
        &[
            ("0001_a.up.sql", "SELECT 1;"),
            ("0001_b.up.sql", "SELECT 1;"),
        ],
    );
    let err = Migrations::from_dir(dup.path()).unwrap_err();
    assert!(
        matches!(err, Error::DuplicateVersion { version: 1, .. }),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains("0001_a.up.sql") && text.contains("0001_b.up.sql"),
        "{text}"
    );

    let bad_name = tempfile::tempdir()?;
    write(bad_name.path(), &[("first_a.up.sql", "SELECT 1;")]);
    let err = Migrations::from_dir(bad_name.path()).unwrap_err();
    assert!(matches!(err, Error::BadFile { .. }), "{err}");
    assert!(err.to_string().contains("first_a.up.sql"), "{err}");

    let err = Migrations::from_dir(gap.path().join("nope")).unwrap_err();
    assert!(matches!(err, Error::ReadDir { .. }), "{err}");
    Ok(())
}

#[tokio::test]
async fn dry_run_shows_the_plan_and_changes_nothing() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let m = migrator(&reference_dir(), &db);
    let plan = m.plan(Operation::Up(UpTarget::Version(2))).await?;
    assert_eq!(
        plan.steps.iter().map(|s| s.version).collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert!(plan.steps[0].sql.contains("CREATE TABLE users"));
    let text = plan.to_string();
    assert!(
        text.contains("-- up 1 users") && text.contains("CREATE TABLE sponsors"),
        "{text}"
    );
    assert!(
        !exists(&db, "_sqlx_migrations").await?,
        "a dry run creates nothing"
    );
    assert!(!exists(&db, "users").await?);

    m.up(UpTarget::Latest).await?;
    let plan = m.plan(Operation::Down(DownTarget::Steps(2))).await?;
    let versions: Vec<i64> = plan.steps.iter().map(|s| s.version).collect();
    assert_eq!(versions, vec![5, 4]);
    assert!(plan.steps.iter().all(|s| s.direction == Direction::Down));
    assert_eq!(applied_versions(&db).await?.len(), 5, "still all applied");
    Ok(())
}

#[tokio::test]
async fn progress_events_and_the_schema_change_hook() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let events: Arc<Mutex<Vec<Event>>> = Arc::default();
    let changes: Arc<Mutex<Vec<Vec<i64>>>> = Arc::default();
    let (e, c) = (Arc::clone(&events), Arc::clone(&changes));
    let m = migrator(&reference_dir(), &db)
        .on_progress(move |ev| e.lock().unwrap().push(ev.clone()))
        .after_schema_change(move |v| c.lock().unwrap().push(v.to_vec()));
    m.up(UpTarget::Version(3)).await?;
    {
        let events = events.lock().unwrap();
        assert!(
            matches!(events.first(), Some(Event::LockAcquired { .. })),
            "{events:?}"
        );
        let applying: Vec<(i64, usize, usize)> = events
            .iter()
            .filter_map(|e| match e {
                Event::Applying {
                    version,
                    index,
                    total,
                    direction: Direction::Up,
                    ..
                } => Some((*version, *index, *total)),
                _ => None,
            })
            .collect();
        assert_eq!(applying, vec![(1, 1, 3), (2, 2, 3), (3, 3, 3)]);
        assert_eq!(
            events
                .iter()
                .filter(|e| matches!(e, Event::Applied { .. }))
                .count(),
            3
        );
        assert!(
            matches!(events.last(), Some(Event::Done { changed: 3, .. })),
            "{events:?}"
        );
    }
    assert_eq!(*changes.lock().unwrap(), vec![vec![1, 2, 3]]);
    // nothing to do: no hook call
    m.up(UpTarget::Version(3)).await?;
    assert_eq!(changes.lock().unwrap().len(), 1);
    m.down(DownTarget::Steps(1)).await?;
    assert_eq!(changes.lock().unwrap().last().unwrap(), &vec![3]);
    Ok(())
}

#[tokio::test]
async fn the_environment_is_recorded_and_read_back() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let m = migrator(&reference_dir(), &db).with_environment(Environment::Production);
    assert_eq!(m.recorded_environment().await?, None);
    m.up(UpTarget::Latest).await?;
    assert_eq!(
        m.recorded_environment().await?,
        Some(Environment::Production)
    );
    m.record_environment(Environment::Staging).await?;
    assert_eq!(m.recorded_environment().await?, Some(Environment::Staging));

    // works without the reference schema's table too
    let other = TestDb::new().await?;
    let dir = tempfile::tempdir()?;
    write(
        dir.path(),
        &[("0001_a.up.sql", "CREATE TABLE a (id int);\n")],
    );
    let m = migrator(dir.path(), &other).with_environment(Environment::Test);
    m.up(UpTarget::Latest).await?;
    assert_eq!(m.recorded_environment().await?, Some(Environment::Test));

    other
        .client()
        .await?
        .batch_execute("UPDATE pgstack_metadata SET value = 'moon'")
        .await?;
    let err = m.recorded_environment().await.unwrap_err();
    assert!(matches!(err, Error::Metadata { .. }), "{err}");
    Ok(())
}

#[tokio::test]
async fn missing_files_and_unknown_targets_are_refused() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let dir = tempfile::tempdir()?;
    write(
        dir.path(),
        &[
            ("0001_a.up.sql", "CREATE TABLE a (id int);\n"),
            ("0002_b.up.sql", "CREATE TABLE b (id int);\n"),
        ],
    );
    migrator(dir.path(), &db).up(UpTarget::Latest).await?;
    std::fs::remove_file(dir.path().join("0002_b.up.sql"))?;
    let m = migrator(dir.path(), &db);
    let status = m.status().await?;
    assert_eq!(status.in_state(MigrationState::MissingFile).count(), 1);
    let err = m.up(UpTarget::Latest).await.unwrap_err();
    assert!(
        matches!(err, Error::MissingFile { version: 2, .. }),
        "{err}"
    );
    assert!(
        m.clone()
            .ignore_missing(true)
            .up(UpTarget::Latest)
            .await
            .is_ok()
    );
    let err = m
        .clone()
        .ignore_missing(true)
        .up(UpTarget::Version(7))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::UnknownVersion { version: 7, .. }),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn connection_errors_do_not_show_the_password() -> anyhow::Result<()> {
    let node = pgstack_config::NodeSettings::from_url("postgres://app:s3cret-pw@127.0.0.1:1/app")?;
    let dir = tempfile::tempdir()?;
    write(dir.path(), &[("0001_a.up.sql", "SELECT 1;")]);
    let m = Migrator::new(Migrations::from_dir(dir.path())?, &node);
    let err = m.status().await.unwrap_err();
    let text = format!("{err} {err:?} {m:?}");
    assert!(matches!(err, Error::Connect { .. }), "{err}");
    assert!(!text.contains("s3cret-pw"), "{text}");
    assert!(text.contains("127.0.0.1:1"), "{text}");
    Ok(())
}

#[tokio::test]
async fn from_config_reads_folder_environment_and_tls() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let mut config = pgstack_config::DatabaseConfig::for_environment(Environment::Test);
    config.primary = node(&db);
    config.migrations.dir = reference_dir();
    config.migrations.lock_timeout = Duration::from_secs(5);
    config.tls.mode = pgstack_config::TlsMode::Disable;
    let m = Migrator::from_config(&config)?;
    assert_eq!(
        m.up(UpTarget::Latest).await?.steps.len(),
        m.migrations().len()
    );
    assert_eq!(m.recorded_environment().await?, Some(Environment::Test));

    // a server that speaks no TLS (the kit's never do; DATABASE_URL's may):
    // a mode that requires it fails clearly
    let plain = pgstack_tests::TestCluster::start().await?;
    let mut no_tls = config.clone();
    no_tls.primary = NodeSettings::from_url(&plain.url("postgres"))?;
    no_tls.tls.mode = pgstack_config::TlsMode::Require;
    let err = Migrator::from_config(&no_tls)?.status().await.unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err}");
    assert!(err.to_string().contains("TLS"), "{err}");

    config.migrations.dir = reference_dir().join("missing");
    assert!(matches!(
        Migrator::from_config(&config),
        Err(Error::ReadDir { .. })
    ));
    Ok(())
}

/// A timing note, not a benchmark: 1,000 small migrations applied by
/// pgstack and by sqlx's `Migrator::run`, each on a fresh database.
/// `cargo test -p pgstack-migrations --release --test migrate -- --ignored --nocapture timing`
#[tokio::test]
#[ignore = "timing note; run by hand"]
async fn timing_1000_migrations_against_sqlx() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("0001_log.up.sql"),
        "CREATE TABLE log (n int);\n",
    )?;
    for v in 2..=1000 {
        std::fs::write(
            dir.path().join(format!("{v:04}_step.up.sql")),
            format!("INSERT INTO log VALUES ({v});\n"),
        )?;
    }
    let ours = Migrations::from_dir(dir.path())?;
    let theirs = sqlx::migrate::Migrator::new(dir.path()).await?;
    let mut pgstack_times = Vec::new();
    let mut sqlx_times = Vec::new();
    for round in 0..3 {
        for which in [round % 2, 1 - round % 2] {
            let db = TestDb::new().await?;
            if which == 0 {
                let m = Migrator::new(ours.clone(), &node(&db));
                let start = std::time::Instant::now();
                assert_eq!(m.up(UpTarget::Latest).await?.steps.len(), 1000);
                pgstack_times.push(start.elapsed());
            } else {
                let start = std::time::Instant::now();
                let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(db.url()).await?;
                theirs.run(&mut conn).await?;
                sqlx::Connection::close(conn).await?;
                sqlx_times.push(start.elapsed());
            }
            assert_eq!(applied_versions(&db).await?.len(), 1000);
        }
    }
    pgstack_times.sort();
    sqlx_times.sort();
    let (ours, sqlx) = (pgstack_times[1], sqlx_times[1]);
    println!(
        "1,000 migrations (median of 3): pgstack {ours:?} ({:.0}/s), sqlx {sqlx:?} ({:.0}/s), \
         pgstack speed = {:.2}x sqlx",
        1000.0 / ours.as_secs_f64(),
        1000.0 / sqlx.as_secs_f64(),
        sqlx.as_secs_f64() / ours.as_secs_f64()
    );
    Ok(())
}

#[tokio::test]
async fn embedded_migrations_match_the_folder() -> anyhow::Result<()> {
    // what `sqlx::migrate!` embeds, built here at run time from the same folder
    let sqlx_migrator = sqlx::migrate::Migrator::new(reference_dir()).await?;
    let embedded = Migrations::from_sqlx(&sqlx_migrator)?;
    let folder = Migrations::from_dir(reference_dir())?;
    assert_eq!(embedded.len(), folder.len());
    for (e, f) in embedded.iter().zip(folder.iter()) {
        assert_eq!(
            (e.version(), e.description()),
            (f.version(), f.description())
        );
        assert_eq!(e.up().checksum(), f.up().checksum());
        assert_eq!(e.down().map(|d| d.sql()), f.down().map(|d| d.sql()));
    }
    // a database migrated from the embedded set is up to date for the folder
    let db = TestDb::new().await?;
    Migrator::new(embedded, &node(&db))
        .up(UpTarget::Latest)
        .await?;
    assert!(
        migrator(&reference_dir(), &db)
            .status()
            .await?
            .is_up_to_date()
    );

    // `include_str!`-style pairs
    let files = Migrations::from_files(
        [
            (
                "0001_users.up.sql",
                include_str!("../../../migrations/0001_users.up.sql"),
            ),
            (
                "0001_users.down.sql",
                include_str!("../../../migrations/0001_users.down.sql"),
            ),
        ],
        &pgstack_migrations::LoadOptions::default(),
    )?;
    assert_eq!(
        files.get(1).unwrap().up().checksum(),
        folder.get(1).unwrap().up().checksum()
    );
    Ok(())
}
