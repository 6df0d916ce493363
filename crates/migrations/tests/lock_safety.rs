//! Lock-safe migrations against a real PostgreSQL server (the test kit's
//! `TestDb`): the lock wait and its retries, what a failed concurrent index
//! build leaves and how it is repaired, and the linter's findings in
//! `validate`, `plan` and `lint`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{applied_versions, exists, migrator, write};
use pgstack_config::Jitter;
use pgstack_migrations::{
    Backoff, Error, Event, MigrationState, Migrations, Operation, Rule, UpTarget,
};
use pgstack_tests::TestDb;

/// Polls `check` until it holds, for at most a minute.
async fn until<F, Fut>(what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    while !check().await? {
        anyhow::ensure!(Instant::now() < deadline, "gave up waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Whether session `pid` waits for a lock.
async fn waits_for_a_lock(client: &tokio_postgres::Client, pid: i32) -> anyhow::Result<bool> {
    Ok(client
        .query_one(
            "SELECT count(*) > 0 FROM pg_locks WHERE pid = $1 AND NOT granted",
            &[&pid],
        )
        .await?
        .get(0))
}

async fn pid_of(client: &tokio_postgres::Client) -> anyhow::Result<i32> {
    Ok(client
        .query_one("SELECT pg_backend_pid()", &[])
        .await?
        .get(0))
}

async fn has_column(db: &TestDb, table: &str, column: &str) -> anyhow::Result<bool> {
    Ok(db
        .client()
        .await?
        .query_one(
            "SELECT count(*) > 0 FROM information_schema.columns \
             WHERE table_schema = 'public' AND table_name = $1 AND column_name = $2",
            &[&table, &column],
        )
        .await?
        .get(0))
}

/// A table `t` with some rows, and a session that read it in a transaction
/// it keeps open (holding ACCESS SHARE, as a long report would).
async fn table_and_holder(db: &TestDb) -> anyhow::Result<(tokio_postgres::Client, i32)> {
    let setup = db.client().await?;
    setup
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, v text);
             INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 200) g;",
        )
        .await?;
    let holder = db.client().await?;
    holder
        .batch_execute(
            "SET application_name = 'long-report'; BEGIN; LOCK TABLE t IN ACCESS SHARE MODE;",
        )
        .await?;
    let pid = pid_of(&holder).await?;
    Ok((holder, pid))
}

fn events_of(events: &Arc<Mutex<Vec<Event>>>) -> Vec<Event> {
    events.lock().unwrap().clone()
}

/// `(attempt, retry_in, blocker pids)` of every `LockNotAvailable` event.
fn lock_events(events: &[Event]) -> Vec<(u32, Option<Duration>, Vec<i32>)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::LockNotAvailable {
                attempt,
                retry_in,
                conflict,
                ..
            } => Some((
                *attempt,
                *retry_in,
                conflict
                    .as_ref()
                    .map(|c| c.blockers.iter().map(|b| b.pid).collect())
                    .unwrap_or_default(),
            )),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_migration_does_not_hold_reads_up_and_applies_once_the_lock_is_free()
-> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let (holder, holder_pid) = table_and_holder(&db).await?;
    let observer = db.client().await?;

    // The hazard first, without pgstack: an ALTER TABLE queued behind the
    // holder makes every later reader of `t` queue behind it.
    let naive = db.client().await?;
    let naive_pid = pid_of(&naive).await?;
    let naive_alter = tokio::spawn(async move {
        naive
            .batch_execute("ALTER TABLE t ADD COLUMN naive int")
            .await
    });
    until("the plain ALTER TABLE waits", || {
        waits_for_a_lock(&observer, naive_pid)
    })
    .await?;
    let reader = db.client().await?;
    reader.batch_execute("SET lock_timeout = '1s'").await?;
    let err = reader
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .expect_err("a reader queued behind the waiting ALTER TABLE");
    assert_eq!(err.code().map(|c| c.code()), Some("55P03"), "{err}");
    observer
        .execute("SELECT pg_cancel_backend($1)", &[&naive_pid])
        .await?;
    assert!(naive_alter.await?.is_err(), "the plain ALTER was cancelled");

    // The same change as a migration: it waits at most lock_wait, gives
    // up, rolls back, and tries again later.
    let dir = tempfile::tempdir()?;
    write(
        dir.path(),
        &[("0001_add_c.up.sql", "ALTER TABLE t ADD COLUMN c int;\n")],
    );
    let lock_wait = Duration::from_millis(300);
    let events: Arc<Mutex<Vec<Event>>> = Arc::default();
    let seen = Arc::clone(&events);
    let m = migrator(dir.path(), &db)
        .lock_wait(lock_wait)
        .lock_retries(1000)
        .lock_retry_backoff(Backoff::new(
            Duration::from_millis(50),
            Duration::from_millis(200),
            2.0,
            Jitter::Equal,
        ))
        .on_progress(move |e| seen.lock().unwrap().push(e.clone()));
    let up = tokio::spawn(async move { m.up(UpTarget::Latest).await });

    // Meanwhile a third session keeps reading `t`, each read allowed ten
    // times lock_wait before it gives up (the plain ALTER made it give up).
    reader.batch_execute("SET lock_timeout = '3s'").await?;
    let mut reads = 0;
    let mut slowest = Duration::ZERO;
    let deadline = Instant::now() + Duration::from_secs(60);
    while lock_events(&events_of(&events)).len() < 3 {
        assert!(Instant::now() < deadline, "the migration never retried");
        assert!(
            !up.is_finished(),
            "the migration ended while the lock was held"
        );
        let started = Instant::now();
        let count: i64 = reader
            .query_one("SELECT count(*) FROM t", &[])
            .await
            .map_err(|e| anyhow::anyhow!("a read failed while the migration waited: {e}"))?
            .get(0);
        assert_eq!(count, 200);
        slowest = slowest.max(started.elapsed());
        reads += 1;
    }
    assert!(reads > 0);
    eprintln!("{reads} reads while the migration retried; the slowest took {slowest:?}");
    assert!(
        !has_column(&db, "t", "c").await?,
        "nothing applied while the lock was held"
    );
    // The migrator looks at its lock waits from a session of its own.
    let watchers = || async {
        let n: i64 = observer
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND application_name = 'pgstack-migrations (lock watch)'",
                &[],
            )
            .await?
            .get(0);
        Ok::<_, anyhow::Error>(n)
    };
    assert_eq!(watchers().await?, 1);

    // The holder commits: the next attempt goes through.
    holder.batch_execute("COMMIT").await?;
    let report = up.await??;
    assert_eq!(report.changed_versions(), vec![1]);
    assert!(has_column(&db, "t", "c").await?);
    assert_eq!(applied_versions(&db).await?, vec![1]);
    until("the lock watch session is closed", || async {
        Ok(watchers().await? == 0)
    })
    .await?;

    let events = events_of(&events);
    let retries = lock_events(&events);
    assert!(retries.len() >= 3, "{events:?}");
    for (i, (attempt, retry_in, _)) in retries.iter().enumerate() {
        assert_eq!(*attempt as usize, i + 1, "attempts counted in order");
        let delay = retry_in.expect("every attempt but the last is retried");
        assert!(
            delay >= Duration::from_millis(25) && delay <= Duration::from_millis(200),
            "backoff with equal jitter: {delay:?}"
        );
    }
    assert!(
        retries
            .iter()
            .any(|(_, _, pids)| pids.contains(&holder_pid)),
        "a retry named the session holding the lock (pid {holder_pid}): {retries:?}"
    );
    assert!(
        matches!(events.last(), Some(Event::Done { changed: 1, .. })),
        "{events:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_that_never_gets_its_lock_fails_clearly_and_leaves_nothing()
-> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let (holder, holder_pid) = table_and_holder(&db).await?;
    let dir = tempfile::tempdir()?;
    write(
        dir.path(),
        &[(
            "0001_side_and_c.up.sql",
            "CREATE TABLE side (x int);\n\nALTER TABLE t ADD COLUMN c int;\n",
        )],
    );
    let events: Arc<Mutex<Vec<Event>>> = Arc::default();
    let seen = Arc::clone(&events);
    let backoff = Backoff::new(
        Duration::from_millis(20),
        Duration::from_millis(50),
        2.0,
        Jitter::Full,
    );
    let m = migrator(dir.path(), &db)
        .lock_wait(Duration::from_millis(400))
        .lock_retries(2)
        .lock_retry_backoff(backoff)
        .on_progress(move |e| seen.lock().unwrap().push(e.clone()));
    let err = m.up(UpTarget::Latest).await.unwrap_err();
    let Error::LockNotAvailable(failure) = &err else {
        panic!("expected the lock error, got {err:?}")
    };
    assert_eq!(failure.version, 1);
    assert_eq!(failure.attempts, 3, "the first attempt and two retries");
    assert!(failure.file.ends_with("0001_side_and_c.up.sql"));
    assert!(!failure.no_transaction);
    let conflict = failure
        .conflict
        .as_ref()
        .expect("the migrator saw what it waited for");
    assert_eq!(conflict.mode, "AccessExclusiveLock");
    assert_eq!(conflict.relation.as_deref(), Some("t"));
    assert_eq!(conflict.blockers[0].pid, holder_pid);
    assert_eq!(conflict.blockers[0].application_name, "long-report");
    let text = err.to_string();
    for part in [
        "0001_side_and_c.up.sql",
        "3 attempt(s)",
        "400ms",
        "AccessExclusiveLock on table t",
        "long-report",
        &format!("pg_terminate_backend({holder_pid})"),
        "nothing of it was applied",
        "migrations.lock_wait",
    ] {
        assert!(text.contains(part), "{part:?} missing from: {text}");
    }
    let retries = lock_events(&events_of(&events));
    assert_eq!(
        retries
            .iter()
            .map(|r| (r.0, r.1.is_some()))
            .collect::<Vec<_>>(),
        vec![(1, true), (2, true), (3, false)]
    );

    // Nothing half-applied: not recorded, and neither statement's change.
    assert!(applied_versions(&db).await?.is_empty());
    assert!(!exists(&db, "side").await?);
    assert!(!has_column(&db, "t", "c").await?);
    let status = m.status().await?;
    assert_eq!(status.entries[0].state, MigrationState::Pending);

    // A `-- no-transaction` file that PostgreSQL runs all-or-nothing is
    // retried the same way, and not marked failed.
    let no_tx = tempfile::tempdir()?;
    write(
        no_tx.path(),
        &[(
            "0001_d.up.sql",
            "-- no-transaction\nALTER TABLE t ADD COLUMN d int;\n\
             CREATE TABLE seen_no_tx AS SELECT current_setting('lock_timeout') AS v;\n",
        )],
    );
    let m = migrator(no_tx.path(), &db)
        .lock_wait(Duration::from_millis(250))
        .lock_retries(1)
        .lock_retry_backoff(backoff);
    let err = m.up(UpTarget::Latest).await.unwrap_err();
    assert!(
        matches!(&err, Error::LockNotAvailable(f) if f.attempts == 2 && f.no_transaction),
        "{err:?}"
    );
    assert!(applied_versions(&db).await?.is_empty(), "no failed mark");
    assert!(!has_column(&db, "t", "d").await?);

    // Once the holder is gone, both apply, with lock_timeout set inside.
    holder.batch_execute("COMMIT").await?;
    m.up(UpTarget::Latest).await?;
    let c = db.client().await?;
    let seen: String = c.query_one("SELECT v FROM seen_no_tx", &[]).await?.get(0);
    assert_eq!(seen, "250ms");
    write(
        no_tx.path(),
        &[(
            "0002_seen.up.sql",
            "CREATE TABLE seen_tx AS SELECT current_setting('lock_timeout') AS v;\n",
        )],
    );
    let m = migrator(no_tx.path(), &db).lock_wait(Duration::from_millis(400));
    assert_eq!(m.up(UpTarget::Latest).await?.changed_versions(), vec![2]);
    let seen: String = c.query_one("SELECT v FROM seen_tx", &[]).await?.get(0);
    assert_eq!(seen, "400ms");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_index_build_waits_for_old_transactions_without_a_lock_timeout()
-> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let c = db.client().await?;
    c.batch_execute(
        "CREATE TABLE t (x int); INSERT INTO t SELECT g FROM generate_series(1, 100) g;
         CREATE TABLE other (y int);",
    )
    .await?;
    // A transaction that never touches `t`: CREATE INDEX CONCURRENTLY still
    // waits for it to end, on a lock that lock_timeout would cut short
    // (leaving an INVALID index).
    let old = db.client().await?;
    old.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM other;")
        .await?;
    let dir = tempfile::tempdir()?;
    write(
        dir.path(),
        &[(
            "0001_idx.up.sql",
            "-- no-transaction\nCREATE INDEX CONCURRENTLY t_x_idx ON t (x);\n",
        )],
    );
    let m = migrator(dir.path(), &db)
        .lock_wait(Duration::from_millis(100))
        .lock_retries(0)
        .application_name("cic-migrator");
    let up = tokio::spawn(async move { m.up(UpTarget::Latest).await });
    let migrator_pid = || async {
        let row = c
            .query_opt(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'cic-migrator' \
                 AND datname = current_database()",
                &[],
            )
            .await?;
        Ok::<_, anyhow::Error>(row.map(|r| r.get::<_, i32>(0)))
    };
    until("the index build waits for the old transaction", || async {
        match migrator_pid().await? {
            Some(pid) => waits_for_a_lock(&c, pid).await,
            None => Ok(false),
        }
    })
    .await?;
    // Several times lock_wait: a lock_timeout would have given up by now.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!up.is_finished(), "the build still waits");
    old.batch_execute("COMMIT").await?;
    assert_eq!(up.await??.changed_versions(), vec![1]);
    let valid: bool = c
        .query_one(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = 't_x_idx'::regclass",
            &[],
        )
        .await?
        .get(0);
    assert!(valid);
    Ok(())
}

#[tokio::test]
async fn a_failed_unique_concurrent_index_is_shown_invalid_and_forget_failed_drops_it()
-> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let dir = tempfile::tempdir()?;
    write(
        dir.path(),
        &[
            (
                "0001_t.up.sql",
                "CREATE TABLE t (x int);\nINSERT INTO t VALUES (1), (2), (2);\n",
            ),
            (
                "0002_key.up.sql",
                "-- no-transaction\nCREATE UNIQUE INDEX CONCURRENTLY t_x_key ON t (x);\n",
            ),
        ],
    );
    let m = migrator(dir.path(), &db);
    let err = m.up(UpTarget::Latest).await.unwrap_err();
    let Error::MigrationFailed(failure) = &err else {
        panic!("{err:?}")
    };
    assert!(failure.dirty);
    assert_eq!(failure.code.as_deref(), Some("23505"));
    assert_eq!(failure.invalid_indexes, vec!["public.t_x_key".to_owned()]);
    let text = err.to_string();
    assert!(
        text.contains("left the INVALID index public.t_x_key behind")
            && text.contains("forget-failed 2"),
        "{text}"
    );

    // An INVALID index no migration built (a hand-made build that failed).
    let c = db.client().await?;
    assert!(
        c.batch_execute("CREATE UNIQUE INDEX CONCURRENTLY by_hand ON t (x)")
            .await
            .is_err()
    );

    let status = m.status().await?;
    let invalid: Vec<(String, Option<i64>)> = status
        .invalid_indexes
        .iter()
        .map(|i| (i.name.clone(), i.version))
        .collect();
    assert_eq!(
        invalid,
        vec![
            ("by_hand".to_owned(), None),
            ("t_x_key".to_owned(), Some(2))
        ]
    );
    assert_eq!(status.invalid_indexes[1].table, "t");
    assert!(
        status.invalid_indexes[1]
            .definition
            .contains("CREATE UNIQUE INDEX t_x_key")
    );
    let shown = status.to_string();
    assert!(
        shown.contains("INVALID index public.t_x_key on t (built by migration 2): left by the failed migration 2; `migrate forget-failed 2` drops it"),
        "{shown}"
    );
    assert!(
        shown.contains("DROP INDEX CONCURRENTLY public.by_hand"),
        "{shown}"
    );

    // Nothing to repair for a version without a failed mark.
    let nothing = m.repair_failed(1).await?;
    assert!(!nothing.removed && nothing.dropped_indexes.is_empty());
    assert!(exists(&db, "t_x_key").await?);

    // Fix the data, repair: the index the migration built is dropped, the
    // other one is left alone, and the migration runs again.
    c.batch_execute("DELETE FROM t WHERE ctid = (SELECT max(ctid) FROM t WHERE x = 2)")
        .await?;
    let repair = m.repair_failed(2).await?;
    assert!(repair.removed);
    assert_eq!(
        repair
            .dropped_indexes
            .iter()
            .map(|i| i.qualified_name())
            .collect::<Vec<_>>(),
        vec!["public.t_x_key"]
    );
    assert!(!exists(&db, "t_x_key").await?);
    assert!(exists(&db, "by_hand").await?);
    assert_eq!(m.up(UpTarget::Latest).await?.changed_versions(), vec![2]);
    let valid: bool = c
        .query_one(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = 't_x_key'::regclass",
            &[],
        )
        .await?
        .get(0);
    assert!(valid);
    assert_eq!(
        m.status()
            .await?
            .invalid_indexes
            .iter()
            .map(|i| i.name.as_str())
            .collect::<Vec<_>>(),
        vec!["by_hand"]
    );
    Ok(())
}

#[tokio::test]
async fn lint_findings_appear_in_validate_plan_and_the_pending_lint() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    let dir = tempfile::tempdir()?;
    write(
        dir.path(),
        &[
            (
                "0001_t.up.sql",
                "CREATE TABLE t (id int, v text);\nCREATE INDEX t_id ON t (id);\n",
            ),
            (
                "0002_v.up.sql",
                "-- the lookup by value\nCREATE INDEX t_v ON t (v);\n",
            ),
        ],
    );
    let m = migrator(dir.path(), &db);
    assert_eq!(Migrations::from_dir(dir.path())?.lint().findings.len(), 1);

    m.up(UpTarget::Version(1)).await?;
    let lint = m.lint().await?;
    assert_eq!(lint.files, 1, "only the pending migration");
    assert_eq!(lint.findings.len(), 1);
    let finding = &lint.findings[0];
    assert_eq!(finding.rule, Rule::RequireConcurrentIndexCreation);
    assert_eq!((finding.version, finding.line), (Some(2), 2));
    assert!(lint.has_errors());

    let validation = m.validate().await?;
    assert!(validation.is_ok(), "lint findings are warnings");
    assert_eq!(validation.findings, lint.findings);
    assert!(
        validation
            .to_string()
            .contains("0002_v.up.sql:2: error [require-concurrent-index-creation]"),
        "{validation}"
    );

    let plan = m.plan(Operation::Up(UpTarget::Latest)).await?;
    assert_eq!(plan.findings, lint.findings);
    let text = plan.to_string();
    assert!(
        text.contains(
            "-- lint error [require-concurrent-index-creation] line 2: CREATE INDEX t_v on t"
        ),
        "{text}"
    );

    m.up(UpTarget::Latest).await?;
    let lint = m.lint().await?;
    assert!(lint.findings.is_empty() && lint.files == 0);
    assert!(m.validate().await?.findings.is_empty());
    Ok(())
}
