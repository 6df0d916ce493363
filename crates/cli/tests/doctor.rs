//! `pgstack doctor`: every check finds the problem it is about, created on a
//! real server from the test kit, names it with its evidence, and (where the
//! fix is SQL) the SQL it prints fixes it: run it, and the finding is gone.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;

use std::time::{Duration, Instant};

use pgstack_cli::doctor::{self, Check, Finding, Options, Report, Severity, Thresholds};
use pgstack_tests::{TestCluster, TestDb};
use tokio_postgres::Client;

async fn examine_with(client: &Client, thresholds: Thresholds, only: &[Check]) -> Report {
    let mut options = Options::default();
    options.thresholds = thresholds;
    options.only = only.to_vec();
    doctor::examine(client, &options).await.unwrap()
}

async fn examine(client: &Client, only: &[Check]) -> Report {
    examine_with(client, Thresholds::default(), only).await
}

fn findings(report: &Report, check: Check) -> Vec<Finding> {
    assert!(report.skipped.is_empty(), "skipped: {:?}", report.skipped);
    report.of(check).cloned().collect()
}

fn only_one(report: &Report, check: Check, subject: &str) -> Finding {
    let found: Vec<_> = findings(report, check)
        .into_iter()
        .filter(|f| f.subject == subject)
        .collect();
    assert_eq!(found.len(), 1, "{subject} in {:#?}", report.findings);
    found.into_iter().next().unwrap()
}

/// Runs a finding's fix: its statements one by one (VACUUM and CONCURRENTLY
/// refuse to run in a multi-statement string), comments dropped.
async fn run_fix(client: &Client, fix_sql: &str) {
    let code: String = fix_sql
        .lines()
        .map(|line| line.split("--").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    for statement in code.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        client
            .batch_execute(statement)
            .await
            .unwrap_or_else(|e| panic!("the fix `{statement}` failed: {:?}", e.as_db_error()));
    }
}

/// Makes this session's statistics visible to other sessions now.
async fn flush_stats(client: &Client) {
    client
        .batch_execute("SELECT pg_stat_force_next_flush()")
        .await
        .unwrap();
    client.batch_execute("SELECT 1").await.unwrap();
}

async fn pid(client: &Client) -> i32 {
    client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_foreign_key_without_an_index_is_found_and_its_fix_creates_it() {
    let db = TestDb::new().await.unwrap();
    let client = db.client().await.unwrap();
    client
        .batch_execute(
            "CREATE TABLE parent (id bigint PRIMARY KEY);
             CREATE TABLE child (id bigint PRIMARY KEY, parent_id bigint REFERENCES parent (id));
             CREATE TABLE indexed_child (id bigint PRIMARY KEY, parent_id bigint REFERENCES parent (id));
             CREATE INDEX ON indexed_child (parent_id);
             -- a partial index on `parent_id IS NOT NULL` serves the lookups too
             CREATE TABLE partial_child (id bigint PRIMARY KEY, parent_id bigint REFERENCES parent (id));
             CREATE INDEX ON partial_child (parent_id) WHERE parent_id IS NOT NULL;
             -- an index that does not start with the key does not
             CREATE TABLE late_child (id bigint PRIMARY KEY, kind int, parent_id bigint REFERENCES parent (id));
             CREATE INDEX ON late_child (kind, parent_id);",
        )
        .await
        .unwrap();

    let report = examine(&client, &[Check::ForeignKeyWithoutIndex]).await;
    let subjects: Vec<_> = report.findings.iter().map(|f| f.subject.as_str()).collect();
    assert_eq!(
        subjects,
        ["public.child (parent_id)", "public.late_child (parent_id)"]
    );
    let child = only_one(
        &report,
        Check::ForeignKeyWithoutIndex,
        "public.child (parent_id)",
    );
    assert_eq!(child.severity, Severity::Warning);
    assert!(
        child.evidence.contains("child_parent_id_fkey"),
        "{}",
        child.evidence
    );
    assert!(
        child.evidence.contains("references public.parent"),
        "{}",
        child.evidence
    );
    assert_eq!(
        child.fix_sql,
        "CREATE INDEX CONCURRENTLY child_parent_id_idx ON public.child (parent_id);"
    );

    run_fix(&client, &child.fix_sql).await;
    let report = examine(&client, &[Check::ForeignKeyWithoutIndex]).await;
    assert!(
        report
            .of(Check::ForeignKeyWithoutIndex)
            .all(|f| f.subject != "public.child (parent_id)"),
        "{:#?}",
        report.findings
    );
}

#[tokio::test]
async fn unused_duplicate_and_redundant_indexes_are_told_apart() {
    let db = TestDb::new().await.unwrap();
    let client = db.client().await.unwrap();
    client
        .batch_execute(
            "CREATE TABLE u (id bigint PRIMARY KEY, k int UNIQUE, v int, w int);
             INSERT INTO u SELECT g, g, g % 1000, g % 777 FROM generate_series(1, 30000) g;
             CREATE INDEX u_v_idx ON u (v);
             CREATE INDEX u_w_idx ON u (w);
             ANALYZE u;
             CREATE TABLE d (id bigint PRIMARY KEY, x int, y int CONSTRAINT d_y_key UNIQUE);
             CREATE INDEX d_x_idx ON d (x);
             CREATE INDEX d_x_again_idx ON d (x);
             CREATE INDEX d_y_plain_idx ON d (y);
             CREATE INDEX d_x_partial_idx ON d (x) WHERE y > 0;
             CREATE TABLE r (id bigint PRIMARY KEY, a int, b int, c int);
             CREATE INDEX r_a_idx ON r (a);
             CREATE INDEX r_a_b_idx ON r (a, b);
             CREATE UNIQUE INDEX r_c_key ON r (c);
             CREATE INDEX r_c_a_idx ON r (c, a);",
        )
        .await
        .unwrap();
    // u_w_idx is used; u_v_idx never is.
    client
        .batch_execute(
            "SET enable_seqscan = off; SELECT count(*) FROM u WHERE w = 5; RESET enable_seqscan",
        )
        .await
        .unwrap();
    flush_stats(&client).await;
    let scans: i64 = client
        .query_one(
            "SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelname = 'u_w_idx'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(scans >= 1, "the setup did not scan u_w_idx");

    let mut t = Thresholds::default();
    t.unused_index_min_bytes = 64 * 1024;
    let report = examine_with(
        &client,
        t,
        &[
            Check::UnusedIndex,
            Check::DuplicateIndex,
            Check::RedundantIndex,
        ],
    )
    .await;

    let unused: Vec<_> = findings(&report, Check::UnusedIndex)
        .into_iter()
        .map(|f| f.subject)
        .collect();
    // Not the used one, not the unique ones, not the small ones.
    assert_eq!(unused, ["public.u_v_idx"], "{:#?}", report.findings);
    let v = only_one(&report, Check::UnusedIndex, "public.u_v_idx");
    assert!(v.evidence.contains("0 scans"), "{}", v.evidence);
    assert_eq!(v.fix_sql, "DROP INDEX CONCURRENTLY public.u_v_idx;");

    let mut duplicates: Vec<_> = findings(&report, Check::DuplicateIndex)
        .into_iter()
        .map(|f| f.subject)
        .collect();
    duplicates.sort();
    // The copies go; the constraint's index and the first by name stay.
    assert_eq!(duplicates, ["public.d_x_idx", "public.d_y_plain_idx"]);
    let x = only_one(&report, Check::DuplicateIndex, "public.d_x_idx");
    assert!(
        x.evidence.contains("duplicates public.d_x_again_idx"),
        "{}",
        x.evidence
    );

    let redundant: Vec<_> = findings(&report, Check::RedundantIndex)
        .into_iter()
        .map(|f| f.subject)
        .collect();
    assert_eq!(redundant, ["public.r_a_idx"], "{:#?}", report.findings);
    let a = only_one(&report, Check::RedundantIndex, "public.r_a_idx");
    assert!(a.evidence.contains("public.r_a_b_idx"), "{}", a.evidence);

    for finding in report.findings.iter() {
        run_fix(&client, &finding.fix_sql).await;
    }
    let mut t = Thresholds::default();
    t.unused_index_min_bytes = 64 * 1024;
    let report = examine_with(
        &client,
        t,
        &[
            Check::UnusedIndex,
            Check::DuplicateIndex,
            Check::RedundantIndex,
        ],
    )
    .await;
    assert!(report.findings.is_empty(), "{:#?}", report.findings);
}

#[tokio::test]
async fn a_failed_concurrent_unique_index_is_invalid_and_its_fix_rebuilds_it() {
    let db = TestDb::new().await.unwrap();
    let client = db.client().await.unwrap();
    client
        .batch_execute(
            "CREATE TABLE inv (id bigint PRIMARY KEY, email text NOT NULL);
             INSERT INTO inv VALUES (1, 'a@example.com'), (2, 'a@example.com'), (3, 'b@example.com');",
        )
        .await
        .unwrap();
    let failed = client
        .batch_execute("CREATE UNIQUE INDEX CONCURRENTLY inv_email_key ON inv (email)")
        .await;
    assert!(failed.is_err(), "the duplicate rows should stop the build");

    let report = examine(&client, &[Check::InvalidIndex]).await;
    let invalid = only_one(&report, Check::InvalidIndex, "public.inv_email_key");
    assert!(invalid.evidence.contains("INVALID"), "{}", invalid.evidence);
    assert!(
        invalid.why.contains("CREATE UNIQUE INDEX CONCURRENTLY"),
        "{}",
        invalid.why
    );
    assert!(
        invalid
            .fix_sql
            .starts_with("DROP INDEX CONCURRENTLY public.inv_email_key;"),
        "{}",
        invalid.fix_sql
    );
    assert!(
        invalid.fix_sql.contains(
            "CREATE UNIQUE INDEX CONCURRENTLY inv_email_key ON public.inv USING btree (email);"
        ),
        "{}",
        invalid.fix_sql
    );

    // As the fix says: remove the duplicates, then drop and build again.
    client
        .batch_execute("DELETE FROM inv WHERE id = 2")
        .await
        .unwrap();
    run_fix(&client, &invalid.fix_sql).await;
    let valid: bool = client
        .query_one(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = 'inv_email_key'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(valid);
    let report = examine(&client, &[Check::InvalidIndex]).await;
    assert!(report.findings.is_empty(), "{:#?}", report.findings);
}

#[tokio::test]
async fn a_constraint_added_not_valid_is_found_and_validated_by_its_fix() {
    let db = TestDb::new().await.unwrap();
    let client = db.client().await.unwrap();
    client
        .batch_execute(
            "CREATE TABLE accounts (id bigint PRIMARY KEY, balance numeric NOT NULL);
             ALTER TABLE accounts ADD CONSTRAINT accounts_balance_check CHECK (balance >= 0) NOT VALID;",
        )
        .await
        .unwrap();
    let report = examine(&client, &[Check::InvalidConstraint]).await;
    let finding = only_one(
        &report,
        Check::InvalidConstraint,
        "public.accounts accounts_balance_check",
    );
    assert!(
        finding
            .evidence
            .contains("CHECK ((balance >= (0)::numeric))"),
        "{}",
        finding.evidence
    );
    assert_eq!(
        finding.fix_sql,
        "ALTER TABLE public.accounts VALIDATE CONSTRAINT accounts_balance_check;"
    );
    run_fix(&client, &finding.fix_sql).await;
    let report = examine(&client, &[Check::InvalidConstraint]).await;
    assert!(report.findings.is_empty(), "{:#?}", report.findings);
}

#[tokio::test]
async fn a_session_idle_in_transaction_is_found_and_its_fix_ends_it() {
    let db = TestDb::new().await.unwrap();
    let client = db.client().await.unwrap();
    let idle = db.client().await.unwrap();
    let idle_pid = pid(&idle).await;
    idle.batch_execute("BEGIN; SELECT 42 AS forgotten")
        .await
        .unwrap();
    // Idle for longer than the threshold (a lower bound: it only grows).
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let mut t = Thresholds::default();
    t.idle_in_transaction = Duration::from_secs(1);
    let report = examine_with(&client, t, &[Check::IdleInTransaction]).await;
    let finding = only_one(
        &report,
        Check::IdleInTransaction,
        &format!("session {idle_pid}"),
    );
    assert!(
        finding.evidence.contains("idle in transaction for"),
        "{}",
        finding.evidence
    );
    assert!(
        finding.evidence.contains("SELECT 42 AS forgotten"),
        "{}",
        finding.evidence
    );
    assert!(
        finding
            .fix_sql
            .contains(&format!("pg_terminate_backend({idle_pid})")),
        "{}",
        finding.fix_sql
    );
    // The doctor's own session and idle sessions outside a transaction are not findings.
    assert_eq!(report.findings.len(), 1, "{:#?}", report.findings);

    run_fix(&client, &finding.fix_sql).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let alive: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)",
                &[&idle_pid],
            )
            .await
            .unwrap()
            .get(0);
        if !alive {
            break;
        }
        assert!(Instant::now() < deadline, "the session survived its fix");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(idle.batch_execute("SELECT 1").await.is_err());
}

#[tokio::test]
async fn a_long_running_statement_is_found_and_its_fix_cancels_it() {
    let db = TestDb::new().await.unwrap();
    let client = db.client().await.unwrap();
    let busy = db.client().await.unwrap();
    let busy_pid = pid(&busy).await;
    let sleeper = tokio::spawn(async move { busy.batch_execute("SELECT pg_sleep(120)").await });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let active: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND state = 'active' \
                 AND query LIKE 'SELECT pg_sleep%')",
                &[&busy_pid],
            )
            .await
            .unwrap()
            .get(0);
        if active {
            break;
        }
        assert!(Instant::now() < deadline, "the statement never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let mut t = Thresholds::default();
    t.long_query = Duration::from_secs(1);
    let report = examine_with(&client, t, &[Check::LongRunningQuery]).await;
    let finding = only_one(
        &report,
        Check::LongRunningQuery,
        &format!("session {busy_pid}"),
    );
    assert!(
        finding.evidence.contains("SELECT pg_sleep(120)"),
        "{}",
        finding.evidence
    );
    run_fix(&client, finding.fix_sql.lines().next().unwrap()).await;
    let cancelled = sleeper.await.unwrap();
    let error = cancelled.expect_err("the statement was not cancelled");
    assert_eq!(
        error.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED),
        "{error}"
    );
}

#[tokio::test]
async fn a_table_full_of_dead_rows_is_found_above_the_size_floor() {
    let db = TestDb::new().await.unwrap();
    let client = db.client().await.unwrap();
    client
        .batch_execute(
            "CREATE TABLE events (id bigint PRIMARY KEY, payload text) WITH (autovacuum_enabled = off);
             INSERT INTO events SELECT g, repeat('x', 60) FROM generate_series(1, 60000) g;
             DELETE FROM events WHERE id % 10 < 6;
             CREATE TABLE tiny (id bigint PRIMARY KEY) WITH (autovacuum_enabled = off);
             INSERT INTO tiny SELECT generate_series(1, 3000);
             DELETE FROM tiny WHERE id > 500;",
        )
        .await
        .unwrap();
    flush_stats(&client).await;

    let mut t = Thresholds::default();
    t.dead_tuples_min_bytes = 1024 * 1024;
    let report = examine_with(&client, t.clone(), &[Check::DeadTuples]).await;
    // tiny has 83 % dead rows but is far below the floor.
    let subjects: Vec<_> = report.findings.iter().map(|f| f.subject.as_str()).collect();
    assert_eq!(subjects, ["public.events"], "{:#?}", report.findings);
    let events = &report.findings[0];
    assert_eq!(
        events.severity,
        Severity::Critical,
        "60 % dead is past 50 %"
    );
    assert!(
        events
            .evidence
            .contains("36,000 dead rows beside 24,000 live ones"),
        "{}",
        events.evidence
    );
    assert!(
        events
            .evidence
            .contains("autovacuum is switched off for this table"),
        "{}",
        events.evidence
    );
    assert!(
        events
            .fix_sql
            .contains("VACUUM (ANALYZE, VERBOSE) public.events;")
    );
    assert!(events.fix_sql.contains("RESET (autovacuum_enabled)"));

    run_fix(&client, &events.fix_sql).await;
    let report = examine_with(&client, t, &[Check::DeadTuples]).await;
    assert!(report.findings.is_empty(), "{:#?}", report.findings);
}

#[tokio::test]
async fn a_large_table_read_by_sequential_scans_is_found() {
    let db = TestDb::new().await.unwrap();
    let client = db.client().await.unwrap();
    client
        .batch_execute(
            "CREATE TABLE readings (id bigint PRIMARY KEY, sensor int);
             INSERT INTO readings SELECT g, g % 100 FROM generate_series(1, 20000) g;
             ANALYZE readings;",
        )
        .await
        .unwrap();
    for _ in 0..60 {
        client
            .batch_execute("SELECT count(*) FROM readings WHERE sensor = 7")
            .await
            .unwrap();
    }
    flush_stats(&client).await;
    let report = examine(&client, &[Check::SequentialScans]).await;
    let finding = only_one(&report, Check::SequentialScans, "public.readings");
    assert!(
        finding.evidence.contains("sequential scans read"),
        "{}",
        finding.evidence
    );
    assert!(
        finding.evidence.contains("20,000 live rows"),
        "{}",
        finding.evidence
    );
}

#[tokio::test]
async fn transaction_id_age_is_judged_against_its_thresholds() {
    let db = TestDb::new().await.unwrap();
    let client = db.client().await.unwrap();
    client
        .batch_execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let subject = format!("database {}", db.name());
    // The defaults: a fresh database is nowhere near.
    let report = examine(&client, &[Check::XidWraparound]).await;
    assert!(
        findings(&report, Check::XidWraparound)
            .iter()
            .all(|f| f.subject != subject)
    );

    let mut t = Thresholds::default();
    t.xid_age_warning = Some(1);
    let report = examine_with(&client, t.clone(), &[Check::XidWraparound]).await;
    let finding = only_one(&report, Check::XidWraparound, &subject);
    assert_eq!(finding.severity, Severity::Warning);
    assert!(
        finding.evidence.contains("age(datfrozenxid) is"),
        "{}",
        finding.evidence
    );
    assert!(
        finding
            .evidence
            .contains("autovacuum_freeze_max_age (200,000,000)"),
        "{}",
        finding.evidence
    );
    assert!(
        finding.evidence.contains("oldest tables:"),
        "{}",
        finding.evidence
    );
    assert!(finding.fix_sql.contains("VACUUM (FREEZE, VERBOSE);"));

    t.xid_age_critical = 1;
    let report = examine_with(&client, t, &[Check::XidWraparound]).await;
    assert_eq!(
        only_one(&report, Check::XidWraparound, &subject).severity,
        Severity::Critical
    );
}

#[tokio::test]
async fn sequences_near_their_end_and_integer_columns_fed_by_bigint_sequences_are_found() {
    let db = TestDb::new().await.unwrap();
    let client = db.client().await.unwrap();
    client
        .batch_execute(
            "CREATE TABLE orders (id serial PRIMARY KEY);
             SELECT setval('orders_id_seq', 2000000000);
             CREATE TABLE tickets (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY);
             SELECT setval(pg_get_serial_sequence('tickets', 'id'), 1700000000);
             CREATE SEQUENCE legacy_seq AS bigint;
             CREATE TABLE legacy (id integer PRIMARY KEY DEFAULT nextval('legacy_seq'));
             SELECT setval('legacy_seq', 1800000000);
             CREATE TABLE fine (id serial PRIMARY KEY);
             INSERT INTO fine DEFAULT VALUES;",
        )
        .await
        .unwrap();
    let report = examine(&client, &[Check::SequenceExhaustion]).await;
    let subjects: Vec<_> = report.findings.iter().map(|f| f.subject.as_str()).collect();
    assert_eq!(
        subjects,
        [
            "public.orders_id_seq",
            "public.legacy_seq",
            "public.tickets_id_seq"
        ],
        "{:#?}",
        report.findings
    );

    let orders = only_one(&report, Check::SequenceExhaustion, "public.orders_id_seq");
    assert_eq!(orders.severity, Severity::Critical);
    assert!(
        orders
            .evidence
            .contains("is at 2,000,000,000 of 2,147,483,647 (93.1%"),
        "{}",
        orders.evidence
    );
    assert!(
        orders
            .evidence
            .contains("it feeds public.orders.id (integer)"),
        "{}",
        orders.evidence
    );

    let legacy = only_one(&report, Check::SequenceExhaustion, "public.legacy_seq");
    assert_eq!(legacy.severity, Severity::Warning, "83.8 % of the column");
    assert!(legacy.evidence.contains("(bigint)"), "{}", legacy.evidence);
    assert!(
        legacy
            .evidence
            .contains("but integer stops at 2,147,483,647: 83.8%"),
        "{}",
        legacy.evidence
    );
    assert_eq!(
        legacy.fix_sql.lines().last().unwrap(),
        "ALTER TABLE public.legacy ALTER COLUMN id TYPE bigint;"
    );

    let tickets = only_one(&report, Check::SequenceExhaustion, "public.tickets_id_seq");
    assert_eq!(tickets.severity, Severity::Warning, "79.2 %");

    for finding in &report.findings {
        run_fix(&client, &finding.fix_sql).await;
    }
    let report = examine(&client, &[Check::SequenceExhaustion]).await;
    assert!(report.findings.is_empty(), "{:#?}", report.findings);
    // And the widened ones go on past the old limit.
    client
        .batch_execute(
            "SELECT setval('orders_id_seq', 3000000000); INSERT INTO orders DEFAULT VALUES",
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn a_table_larger_than_the_cache_read_over_and_over_lowers_the_hit_ratio() {
    let db = TestDb::new().await.unwrap();
    let client = db.client().await.unwrap();
    // The kit's servers have 32 MB of shared_buffers; this table is larger,
    // so its sequential scans read through a small ring of buffers.
    client
        .batch_execute(
            "CREATE TABLE big (id bigint, pad text);
             INSERT INTO big SELECT g, repeat('p', 200) FROM generate_series(1, 200000) g;",
        )
        .await
        .unwrap();
    for _ in 0..3 {
        client
            .batch_execute("SELECT count(*) FROM big WHERE pad = 'no'")
            .await
            .unwrap();
    }
    flush_stats(&client).await;
    let mut t = Thresholds::default();
    t.cache_min_blocks = 1_000;
    let report = examine_with(&client, t, &[Check::CacheHitRatio]).await;
    let finding = only_one(
        &report,
        Check::CacheHitRatio,
        &format!("tables of {}", db.name()),
    );
    assert!(
        finding.evidence.contains("served from shared buffers"),
        "{}",
        finding.evidence
    );
    assert!(
        finding.evidence.contains("shared_buffers is 32MB"),
        "{}",
        finding.evidence
    );
    assert!(
        finding.fix_sql.contains("shared_buffers"),
        "{}",
        finding.fix_sql
    );
}

#[tokio::test]
async fn an_inactive_slot_and_a_nearly_full_connection_table_are_found() {
    let cluster = TestCluster::start().await.unwrap();
    let admin = cluster.client("postgres").await.unwrap();
    admin
        .batch_execute("ALTER SYSTEM SET max_connections = 20")
        .await
        .unwrap();
    drop(admin);
    cluster.restart().await.unwrap();
    let client = cluster.client("postgres").await.unwrap();
    client
        .batch_execute(
            "SELECT pg_create_physical_replication_slot('gone_standby', true);
             CREATE TABLE wal_maker AS SELECT g FROM generate_series(1, 50000) g;",
        )
        .await
        .unwrap();
    // 20 connections, 3 reserved for superusers: 17 usable; with these 14 and
    // this one (which the doctor uses), 15 are in use (88 %).
    let mut others = Vec::new();
    for _ in 0..14 {
        others.push(cluster.client("postgres").await.unwrap());
    }

    let report = examine(&client, &[Check::ReplicationSlot, Check::Connections]).await;
    let slot = only_one(&report, Check::ReplicationSlot, "slot gone_standby");
    assert_eq!(slot.severity, Severity::Warning);
    assert!(
        slot.evidence
            .contains("physical slot gone_standby is inactive"),
        "{}",
        slot.evidence
    );
    assert!(
        slot.fix_sql
            .contains("pg_drop_replication_slot('gone_standby')"),
        "{}",
        slot.fix_sql
    );
    let connections = only_one(&report, Check::Connections, "server connections");
    assert!(
        connections.evidence.contains("of 17 usable"),
        "{}",
        connections.evidence
    );

    // Holding more than the retained-WAL threshold makes the slot critical.
    let mut t = Thresholds::default();
    t.slot_retained_bytes = 1;
    let report = examine_with(&client, t, &[Check::ReplicationSlot]).await;
    assert_eq!(
        only_one(&report, Check::ReplicationSlot, "slot gone_standby").severity,
        Severity::Critical
    );

    // The binary: JSON, exit 2 for a critical finding.
    let out = pgstack(&[
        "doctor",
        "--json",
        "--check",
        "replication_slot",
        "--slot-retained-size",
        "1",
        "--database-url",
        &cluster.url("postgres"),
    ])
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", explain(&out));
    let report = json(&out);
    assert_eq!(report["status"], "critical");
    assert_eq!(report["checks"], serde_json::json!(["replication_slot"]));
    assert_eq!(report["findings"][0]["check"], "replication_slot");
    assert_eq!(report["findings"][0]["severity"], "critical");
    assert_eq!(report["findings"][0]["subject"], "slot gone_standby");

    // Dropping the slot, as its fix says, ends the finding.
    run_fix(&client, slot.fix_sql.lines().nth(1).unwrap()).await;
    drop(others);
    let report = examine(&client, &[Check::ReplicationSlot]).await;
    assert!(report.findings.is_empty(), "{:#?}", report.findings);
}

/// Waits until the replica has received the primary's WAL up to now.
async fn wait_for_receipt(primary: &Client, replica: &Client) {
    let target: String = primary
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let received: bool = replica
            .query_one(
                "SELECT pg_last_wal_receive_lsn() >= $1::text::pg_lsn",
                &[&target],
            )
            .await
            .unwrap()
            .get(0);
        if received {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the replica never received {target}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_lagging_replica_is_found_from_the_primary_and_from_itself() {
    let primary = TestCluster::start().await.unwrap();
    let replica = primary.replica().await.unwrap();
    replica.pause_replay().await.unwrap();
    let writer = primary.client("postgres").await.unwrap();
    writer
        .batch_execute(
            "CREATE TABLE lag_maker AS SELECT g, repeat('w', 100) AS pad FROM generate_series(1, 20000) g",
        )
        .await
        .unwrap();
    let on_replica = replica.client("postgres").await.unwrap();
    wait_for_receipt(&writer, &on_replica).await;

    let mut t = Thresholds::default();
    t.replica_lag_bytes = 1024 * 1024;
    t.replica_lag = Duration::from_secs(3600);
    let report = examine_with(&writer, t.clone(), &[Check::ReplicationLag]).await;
    let standby = findings(&report, Check::ReplicationLag);
    assert_eq!(standby.len(), 1, "{standby:#?}");
    assert!(
        standby[0].subject.starts_with("standby "),
        "{}",
        standby[0].subject
    );
    assert!(
        standby[0].evidence.contains("has replayed up to"),
        "{}",
        standby[0].evidence
    );

    let from_itself = doctor::examine_replica(&on_replica, "r1", &t)
        .await
        .unwrap();
    assert_eq!(from_itself.len(), 1, "{from_itself:#?}");
    assert_eq!(from_itself[0].subject, "replica r1");
    assert!(
        from_itself[0].evidence.contains("(replay is paused)"),
        "{}",
        from_itself[0].evidence
    );
    assert!(
        from_itself[0]
            .fix_sql
            .contains("SELECT pg_wal_replay_resume();")
    );

    // The binary checks the configured replicas too.
    let out = pgstack(&[
        "doctor",
        "--json",
        "--check",
        "replication_lag",
        "--replica-lag-size",
        "1MiB",
        "--replica-lag",
        "1h",
    ])
    .env("DATABASE_URL", primary.url("postgres"))
    .env("DATABASE_REPLICA_URLS", replica.url("postgres"))
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", explain(&out));
    let json = json(&out);
    let subjects: Vec<_> = json["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["subject"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(subjects.len(), 2, "{json}");
    assert!(subjects.iter().any(|s| s.starts_with("standby ")), "{json}");
    assert!(
        subjects
            .iter()
            .any(|s| s == &format!("replica {}", replica.url("postgres"))),
        "{json}"
    );

    // Resumed and caught up: nothing to report.
    run_fix(&on_replica, "SELECT pg_wal_replay_resume();").await;
    replica.wait_for_replay().await.unwrap();
    let from_itself = doctor::examine_replica(&on_replica, "r1", &t)
        .await
        .unwrap();
    assert!(from_itself.is_empty(), "{from_itself:#?}");
}

#[tokio::test]
async fn the_binary_prints_evidence_why_and_fix_exits_1_and_hides_the_password() {
    let db = TestDb::new().await.unwrap();
    db.client()
        .await
        .unwrap()
        .batch_execute(
            "CREATE TABLE parent (id bigint PRIMARY KEY);
             CREATE TABLE child (id bigint PRIMARY KEY, parent_id bigint REFERENCES parent (id));",
        )
        .await
        .unwrap();
    let url = with_password(db.url(), "pw-not-shown");
    let out = pgstack(&["doctor", "--database-url", &url])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", explain(&out));
    let text = stdout(&out);
    assert!(text.contains("1 warning(s)"), "{text}");
    assert!(
        text.contains("[WARNING] fk_without_index — public.child (parent_id)"),
        "{text}"
    );
    assert!(
        text.contains("  evidence: foreign key child_parent_id_fkey"),
        "{text}"
    );
    assert!(
        text.contains("  why:      Every DELETE of a row of public.parent"),
        "{text}"
    );
    assert!(
        text.contains(
            "    CREATE INDEX CONCURRENTLY child_parent_id_idx ON public.child (parent_id);"
        ),
        "{text}"
    );
    assert!(
        !explain(&out).contains("pw-not-shown"),
        "the password leaked"
    );

    let out = pgstack(&["doctor", "--json", "--database-url", &url])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", explain(&out));
    let report = json(&out);
    assert_eq!(report["status"], "warning");
    assert_eq!(report["checks"].as_array().unwrap().len(), Check::ALL.len());
    let finding = &report["findings"][0];
    for field in ["check", "severity", "subject", "evidence", "why", "fix_sql"] {
        assert!(finding[field].is_string(), "{field} in {finding}");
    }
    assert!(!explain(&out).contains("pw-not-shown"));
}

#[test]
fn an_unreachable_server_is_critical() {
    let out = pgstack(&[
        "doctor",
        "--timeout",
        "10s",
        "--database-url",
        "postgres://app:pw-not-shown@127.0.0.1:1/app",
    ])
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", explain(&out));
    assert!(
        stdout(&out).contains("CRITICAL: cannot examine"),
        "{}",
        explain(&out)
    );
    assert!(!explain(&out).contains("pw-not-shown"));
}

#[tokio::test]
async fn the_reference_schema_after_db_reset_is_clean() {
    let db = TestDb::new().await.unwrap();
    ok(&mut pgstack(&["db-reset", "--database-url", db.url()]));
    let out = pgstack(&["doctor", "--json", "--database-url", db.url()])
        .output()
        .unwrap();
    let report = json(&out);
    assert_eq!(out.status.code(), Some(0), "{report:#}");
    assert_eq!(report["findings"], serde_json::json!([]));
    assert_eq!(report["skipped"], serde_json::json!([]));
}
