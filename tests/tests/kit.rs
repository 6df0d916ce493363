//! The test kit's own tests, against real PostgreSQL servers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use pgstack_tests::{
    ChaosProxy, KitError, PgBinaries, ProxyMode, TestCluster, TestDb, connect_url,
};

async fn count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test]
async fn a_cluster_starts_and_answers() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    assert_eq!(cluster.host(), "127.0.0.1");
    assert_eq!(cluster.addr().port(), cluster.port());
    assert_eq!(
        cluster.url("app"),
        format!("postgres://postgres@127.0.0.1:{}/app", cluster.port())
    );
    let client = cluster.client("postgres").await?;
    let row = client
        .query_one(
            "SELECT 1 + 1, pg_is_in_recovery(), current_user::text, \
             current_setting('fsync'), current_setting('synchronous_commit'), \
             current_setting('max_connections')::int, current_setting('wal_level'), \
             current_setting('listen_addresses')",
            &[],
        )
        .await?;
    assert_eq!(row.get::<_, i32>(0), 2);
    assert!(!row.get::<_, bool>(1));
    assert_eq!(row.get::<_, String>(2), "postgres");
    assert_eq!(row.get::<_, String>(3), "off");
    assert_eq!(row.get::<_, String>(4), "off");
    assert!(row.get::<_, i32>(5) >= 300);
    assert_eq!(row.get::<_, String>(6), "replica");
    assert_eq!(row.get::<_, String>(7), "127.0.0.1");
    assert!(cluster.log_path().is_file(), "{:?}", cluster.log_path());
    assert!(cluster.is_running());

    // The server never runs as root, and the files go away on drop.
    let pid_file = cluster.data_dir().join("postmaster.pid");
    let pid = std::fs::read_to_string(&pid_file)?
        .lines()
        .next()
        .unwrap()
        .to_owned();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let uid_line = status
        .lines()
        .find(|line| line.starts_with("Uid:"))
        .unwrap();
    assert_ne!(uid_line.split_whitespace().nth(1), Some("0"), "{uid_line}");
    let root = cluster.data_dir().parent().unwrap().to_path_buf();
    drop(client);
    drop(cluster);
    assert!(!root.exists(), "{root:?} should be removed on drop");
    assert!(
        !PathBuf::from(format!("/proc/{pid}/cmdline")).exists() || {
            // a zombie (the container's init may not reap) has an empty cmdline
            std::fs::read(format!("/proc/{pid}/cmdline"))?.is_empty()
        }
    );
    Ok(())
}

#[tokio::test]
async fn clusters_get_distinct_ports() -> anyhow::Result<()> {
    let (a, b, c) = tokio::try_join!(
        TestCluster::start(),
        TestCluster::start(),
        TestCluster::start()
    )?;
    let mut ports = vec![a.port(), b.port(), c.port()];
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 3);
    for cluster in [&a, &b, &c] {
        assert_eq!(
            count(&cluster.client("postgres").await?, "SELECT 7::bigint").await,
            7
        );
    }
    Ok(())
}

#[tokio::test]
async fn kill9_then_start_again_recovers_committed_data() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let client = cluster.client("postgres").await?;
    client
        .batch_execute("CREATE TABLE bills (id int PRIMARY KEY); INSERT INTO bills SELECT generate_series(1, 100)")
        .await?;
    cluster.kill9().await?;
    assert!(!cluster.is_running());
    assert!(
        client.simple_query("SELECT 1").await.is_err(),
        "the old connection must be dead"
    );
    assert!(cluster.client("postgres").await.is_err(), "nobody listens");

    cluster.start_again().await?;
    let client = cluster.client("postgres").await?;
    assert_eq!(count(&client, "SELECT count(*) FROM bills").await, 100);
    let log = std::fs::read_to_string(cluster.log_path())?;
    assert!(
        log.contains("not properly shut down") || log.contains("redo"),
        "crash recovery should show in the log:\n{}",
        cluster.log_tail(20)
    );

    // Terminated sessions break; the server stays up.
    let other = cluster.client("postgres").await?;
    assert!(cluster.terminate_backends().await? >= 2);
    assert!(client.simple_query("SELECT 1").await.is_err());
    assert!(other.simple_query("SELECT 1").await.is_err());
    let client = cluster.client("postgres").await?;
    assert_eq!(count(&client, "SELECT count(*) FROM bills").await, 100);

    // stop / restart keep the data and the port too.
    let port = cluster.port();
    cluster.restart().await?;
    assert_eq!(cluster.port(), port);
    let client = cluster.client("postgres").await?;
    assert_eq!(count(&client, "SELECT count(*) FROM bills").await, 100);
    cluster.stop().await?;
    cluster.stop().await?; // already down: fine
    assert!(cluster.client("postgres").await.is_err());
    cluster.start_again().await?;
    assert_eq!(
        count(
            &cluster.client("postgres").await?,
            "SELECT count(*) FROM bills"
        )
        .await,
        100
    );
    Ok(())
}

#[tokio::test]
async fn a_replica_streams_and_lags_while_replay_is_paused() -> anyhow::Result<()> {
    let primary = TestCluster::start().await?;
    let replica = primary.replica().await?;
    assert!(replica.is_replica());
    assert_eq!(replica.primary_port(), Some(primary.port()));
    assert_ne!(replica.port(), primary.port());

    let writer = primary.client("postgres").await?;
    writer
        .batch_execute("CREATE TABLE notes (id int); INSERT INTO notes VALUES (1)")
        .await?;
    replica.wait_for_replay().await?;
    let reader = replica.client("postgres").await?;
    assert!(
        reader
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await?
            .get::<_, bool>(0)
    );
    assert_eq!(count(&reader, "SELECT count(*) FROM notes").await, 1);
    assert!(
        reader
            .batch_execute("INSERT INTO notes VALUES (9)")
            .await
            .is_err(),
        "a replica is read-only"
    );

    replica.pause_replay().await?;
    writer
        .batch_execute("INSERT INTO notes SELECT generate_series(2, 1000)")
        .await?;
    assert!(replica.replay_lag_bytes().await? > 0);
    assert!(
        replica
            .wait_for_replay_within(Duration::from_millis(300))
            .await
            .is_err(),
        "paused replay must not catch up"
    );
    assert_eq!(count(&reader, "SELECT count(*) FROM notes").await, 1);

    replica.resume_replay().await?;
    replica.wait_for_replay().await?;
    assert_eq!(count(&reader, "SELECT count(*) FROM notes").await, 1000);

    // Pausing is for replicas only.
    let error = primary.pause_replay().await.unwrap_err();
    assert!(error.to_string().contains("needs a replica"), "{error}");

    // A promoted replica takes writes.
    replica.promote().await?;
    let promoted = replica.client("postgres").await?;
    promoted
        .batch_execute("INSERT INTO notes VALUES (1001)")
        .await?;
    assert_eq!(count(&promoted, "SELECT count(*) FROM notes").await, 1001);
    Ok(())
}

#[tokio::test]
async fn test_dbs_are_fresh_isolated_and_dropped() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let a = TestDb::on(&cluster).await?;
    let b = TestDb::on(&cluster).await?;
    assert_ne!(a.name(), b.name());
    assert!(a.url().ends_with(&format!("/{}", a.name())), "{}", a.url());
    let a_client = a.client().await?;
    a_client
        .batch_execute("CREATE TABLE only_in_a (id int)")
        .await?;
    let b_client = b.client().await?;
    assert_eq!(
        count(
            &b_client,
            "SELECT count(*) FROM pg_tables WHERE tablename = 'only_in_a'"
        )
        .await,
        0
    );
    let current: String = a_client
        .query_one("SELECT current_database()::text", &[])
        .await?
        .get(0);
    assert_eq!(current, a.name());

    let admin = cluster.client("postgres").await?;
    let name = a.name().to_owned();
    let exists = "SELECT count(*) FROM pg_database WHERE datname = $1";
    assert_eq!(admin.query_one(exists, &[&name]).await?.get::<_, i64>(0), 1);
    // Dropped even though a connection is still open to it.
    drop(a);
    assert_eq!(admin.query_one(exists, &[&name]).await?.get::<_, i64>(0), 0);
    assert!(a_client.simple_query("SELECT 1").await.is_err());
    drop(b);
    Ok(())
}

#[tokio::test]
async fn test_db_on_an_explicit_url_uses_that_server() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let db = TestDb::on_url(&cluster.url("postgres")).await?;
    assert!(
        db.url().starts_with(&format!(
            "postgres://postgres@127.0.0.1:{}/",
            cluster.port()
        )),
        "{}",
        db.url()
    );
    let admin = cluster.client("postgres").await?;
    let name = db.name().to_owned();
    assert_eq!(
        admin
            .query_one(
                "SELECT count(*) FROM pg_database WHERE datname = $1",
                &[&name]
            )
            .await?
            .get::<_, i64>(0),
        1
    );
    // key=value connection strings work as well.
    let kv = TestDb::on_url(&format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres",
        cluster.port()
    ))
    .await?;
    kv.client()
        .await?
        .batch_execute("CREATE TABLE t (id int)")
        .await?;

    let error = TestDb::on_url("nonsense").await.unwrap_err();
    assert!(error.to_string().contains("postgres://"), "{error}");
    Ok(())
}

#[tokio::test]
async fn test_db_new_works_from_many_runtimes() -> anyhow::Result<()> {
    // Each #[tokio::test] has its own runtime; the shared cluster must work
    // from all of them. Simulate that with a few extra runtimes.
    let db = TestDb::new().await?;
    db.client()
        .await?
        .batch_execute("CREATE TABLE t (id int)")
        .await?;
    let handles: Vec<_> = (0..3)
        .map(|_| {
            std::thread::spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(async {
                        let db = TestDb::new().await.unwrap();
                        let client = db.client().await.unwrap();
                        client
                            .batch_execute("CREATE TABLE t (id int)")
                            .await
                            .unwrap();
                        db.name().to_owned()
                    })
            })
        })
        .collect();
    let mut names: Vec<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    names.push(db.name().to_owned());
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 4);
    Ok(())
}

/// Runs one `#[ignore]`d test of this binary in a child process.
fn run_child(test: &str, envs: &[(&str, String)]) -> std::process::Output {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args([
            "--exact",
            test,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env_remove("DATABASE_URL");
    for (key, value) in envs {
        command.env(key, value);
    }
    command.output().unwrap()
}

#[tokio::test]
async fn test_db_new_uses_database_url_when_set() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let output = run_child(
        "child_test_db_new_on_database_url",
        &[
            ("DATABASE_URL", cluster.url("postgres")),
            ("EXPECTED_PORT", cluster.port().to_string()),
        ],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The child dropped its database again.
    let admin = cluster.client("postgres").await?;
    assert_eq!(
        count(
            &admin,
            "SELECT count(*) FROM pg_database WHERE datname LIKE 'pgstack_test_%'"
        )
        .await,
        0
    );
    Ok(())
}

#[tokio::test]
#[ignore = "run by test_db_new_uses_database_url_when_set"]
async fn child_test_db_new_on_database_url() -> anyhow::Result<()> {
    let port = std::env::var("EXPECTED_PORT")?;
    let db = TestDb::new().await?;
    assert!(db.url().contains(&format!(":{port}/")), "{}", db.url());
    db.client().await?.batch_execute("SELECT 1").await?;
    Ok(())
}

#[tokio::test]
async fn a_leaked_cluster_is_removed_when_the_process_exits() -> anyhow::Result<()> {
    let output = run_child("child_leaks_a_cluster", &[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "child failed:\n{stdout}\n{stderr}");
    let mut data_dir = None;
    let mut pid = None;
    for line in stdout.lines() {
        if let Some((_, dir)) = line.split_once("LEAKED_DATA_DIR=") {
            data_dir = Some(PathBuf::from(dir.trim()));
        }
        if let Some((_, p)) = line.split_once("LEAKED_PID=") {
            pid = Some(p.trim().to_owned());
        }
    }
    let data_dir = data_dir.unwrap_or_else(|| panic!("no data dir printed:\n{stdout}\n{stderr}"));
    let pid = pid.expect("the child printed the postmaster pid");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let postmaster_alive = String::from_utf8_lossy(&cmdline).contains("postgres");
        if !data_dir.exists() && !postmaster_alive {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the watchdog did not clean up {data_dir:?} (postmaster alive: {postmaster_alive})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

#[tokio::test]
#[ignore = "run by a_leaked_cluster_is_removed_when_the_process_exits"]
async fn child_leaks_a_cluster() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let pid = std::fs::read_to_string(cluster.data_dir().join("postmaster.pid"))?;
    println!("LEAKED_DATA_DIR={}", cluster.data_dir().display());
    println!("LEAKED_PID={}", pid.lines().next().unwrap());
    std::mem::forget(cluster);
    Ok(())
}

#[tokio::test]
async fn a_failing_test_keeps_the_log_and_says_where() -> anyhow::Result<()> {
    let output = run_child("child_panics_with_a_cluster", &[]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let line = stderr
        .lines()
        .find(|line| line.contains("kept the PostgreSQL server files"))
        .unwrap_or_else(|| panic!("no log notice in:\n{stderr}"));
    let log = line
        .rsplit_once("(log: ")
        .map(|(_, rest)| PathBuf::from(rest.trim_end_matches(')')))
        .unwrap();
    assert!(log.is_file(), "{log:?}");
    let root = log.parent().unwrap().to_path_buf();
    // No server is left running, and the watchdog keeps its hands off.
    let data = root.join("data");
    assert!(!data.join("postmaster.pid").exists());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(log.is_file(), "the kept log must survive the process");
    std::fs::remove_dir_all(root)?;
    Ok(())
}

#[tokio::test]
async fn pgstack_kit_keep_keeps_the_files_of_tests_that_return_errors() -> anyhow::Result<()> {
    let output = run_child(
        "child_returns_an_error_with_a_cluster",
        &[("PGSTACK_KIT_KEEP", "1".to_owned())],
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let line = stderr
        .lines()
        .find(|line| line.contains("PGSTACK_KIT_KEEP is set; kept the PostgreSQL server files"))
        .unwrap_or_else(|| panic!("no log notice in:\n{stderr}"));
    let log = line
        .rsplit_once("(log: ")
        .map(|(_, rest)| PathBuf::from(rest.trim_end_matches(')')))
        .unwrap();
    assert!(log.is_file(), "{log:?}");
    std::fs::remove_dir_all(log.parent().unwrap())?;
    Ok(())
}

#[tokio::test]
#[ignore = "run by pgstack_kit_keep_keeps_the_files_of_tests_that_return_errors"]
async fn child_returns_an_error_with_a_cluster() -> anyhow::Result<()> {
    let _cluster = TestCluster::start().await?;
    anyhow::bail!("deliberate failure")
}

#[tokio::test]
#[ignore = "run by a_failing_test_keeps_the_log_and_says_where"]
async fn child_panics_with_a_cluster() {
    let _cluster = TestCluster::start().await.unwrap();
    panic!("deliberate failure");
}

#[test]
fn missing_binaries_say_how_to_fix_it() {
    // Typed (pgstack-localpg's error); through `?` in an anyhow function it
    // still downcasts to KitError.
    let error: anyhow::Error = PgBinaries::in_dir("/nonexistent/pg/bin")
        .unwrap_err()
        .into();
    let kit = error.downcast_ref::<KitError>().unwrap();
    assert!(matches!(kit, KitError::NoBinaries { .. }));
    let text = error.to_string();
    assert!(text.contains("apt-get install postgresql"), "{text}");
    assert!(text.contains("DATABASE_URL"), "{text}");
}

#[test]
fn binaries_are_found_here() {
    let bins = PgBinaries::find().unwrap();
    assert!(bins.tool("pg_basebackup").is_file());
    assert!(bins.major_version().unwrap() >= 13);
}

// ---------------------------------------------------------------- ChaosProxy

async fn proxied_client(proxy: &ChaosProxy) -> anyhow::Result<tokio_postgres::Client> {
    connect_url(&proxy.url("postgres")).await
}

async fn round_trip(client: &tokio_postgres::Client) -> Duration {
    let started = Instant::now();
    client.simple_query("SELECT 1").await.unwrap();
    started.elapsed()
}

#[tokio::test]
async fn proxy_modes_do_what_they_say() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let proxy = ChaosProxy::start(cluster.addr()).await?;
    assert_ne!(proxy.port(), cluster.port());
    assert_eq!(proxy.addr().ip().to_string(), "127.0.0.1");

    // Pass-through.
    let client = proxied_client(&proxy).await?;
    assert_eq!(count(&client, "SELECT 41::bigint + 1").await, 42);
    assert_eq!(proxy.accepted(), 1);
    assert_eq!(proxy.active(), 1);
    let fast = round_trip(&client).await;

    // Latency: each chunk is delayed in both directions.
    proxy.set_mode(ProxyMode::Latency(Duration::from_millis(100)));
    let slow = round_trip(&client).await;
    assert!(
        slow >= Duration::from_millis(200),
        "a round trip through 100 ms latency took {slow:?}"
    );
    proxy.set_mode(ProxyMode::PassThrough);
    let back = round_trip(&client).await;
    assert!(
        back < Duration::from_millis(200),
        "latency did not go away: {back:?} (fast was {fast:?})"
    );

    // Refuse: connects fail fast, open connections keep working.
    proxy.set_mode(ProxyMode::Refuse);
    let started = Instant::now();
    assert!(proxied_client(&proxy).await.is_err());
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(proxy.stats().refused, 1);
    round_trip(&client).await;

    // Blackhole: connects hang, open connections stall, and resume when healed.
    proxy.set_mode(ProxyMode::Blackhole);
    let hung = tokio::time::timeout(Duration::from_millis(300), proxied_client(&proxy)).await;
    assert!(hung.is_err(), "a connect into a black hole must time out");
    let query = client.simple_query("SELECT 2");
    tokio::pin!(query);
    let stalled = tokio::time::timeout(Duration::from_millis(300), &mut query).await;
    assert!(stalled.is_err(), "a query into a black hole must hang");
    proxy.set_mode(ProxyMode::PassThrough);
    let healed = tokio::time::timeout(Duration::from_secs(5), &mut query).await;
    assert!(
        matches!(healed, Ok(Ok(_))),
        "the partition healed: the query completes"
    );

    // reset_all: every open connection breaks at once; new ones work.
    let second = proxied_client(&proxy).await?;
    let resets_before = proxy.stats().reset;
    proxy.reset_all();
    assert!(client.simple_query("SELECT 1").await.is_err());
    assert!(second.simple_query("SELECT 1").await.is_err());
    assert!(proxy.stats().reset >= resets_before + 2);
    let third = proxied_client(&proxy).await?;
    round_trip(&third).await;

    // Reset mode: new connections are reset, open ones on their next traffic.
    proxy.set_mode(ProxyMode::Reset);
    assert!(proxied_client(&proxy).await.is_err());
    let error = third.simple_query("SELECT 1").await.unwrap_err();
    assert!(
        error.is_closed()
            || error.to_string().contains("reset")
            || error.to_string().contains("closed"),
        "{error}"
    );
    proxy.set_mode(ProxyMode::PassThrough);
    round_trip(&proxied_client(&proxy).await?).await;
    assert_eq!(proxy.mode(), ProxyMode::PassThrough);
    Ok(())
}

#[tokio::test]
async fn a_proxy_in_front_of_a_dead_server_resets() -> anyhow::Result<()> {
    let cluster = TestCluster::start().await?;
    let proxy = ChaosProxy::start(cluster.addr()).await?;
    cluster.stop().await?;
    let started = Instant::now();
    assert!(proxied_client(&proxy).await.is_err());
    assert!(started.elapsed() < Duration::from_secs(2));
    cluster.start_again().await?;
    round_trip(&proxied_client(&proxy).await?).await;
    drop(proxy);
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn the_kit_works_under_a_paused_clock() -> anyhow::Result<()> {
    let db = TestDb::new().await?;
    db.client()
        .await?
        .batch_execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1)")
        .await?;
    let cluster = TestCluster::start().await?;
    let client = cluster.client("postgres").await?;
    client
        .batch_execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1)")
        .await?;
    let replica = cluster.replica().await?;
    replica.wait_for_replay().await?;
    replica.pause_replay().await?;
    replica.resume_replay().await?;
    cluster.kill9().await?;
    cluster.start_again().await?;
    assert_eq!(
        count(&cluster.client("postgres").await?, "SELECT count(*) FROM t").await,
        1
    );
    Ok(())
}

#[tokio::test]
async fn keep_resetting_waits_for_finished_operations_between_resets() -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    // No connection goes through: only the pacing is under test.
    let proxy = ChaosProxy::start("127.0.0.1:9".parse()?).await?;
    let stop = AtomicBool::new(false);
    let ended = AtomicU64::new(0);
    let operations = async {
        // Nothing ends for 300 ms: no reset, whatever the pauses.
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Then 5 operations end, twice: one reset after each batch, since
        // each pause (10-60 ms) is shorter than the 300 ms between them.
        for _ in 0..2 {
            ended.fetch_add(5, Ordering::Release);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        // Fewer than 5 more: no third reset.
        ended.fetch_add(4, Ordering::Release);
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.store(true, Ordering::Release);
    };
    let (resets, ()) = tokio::join!(proxy.keep_resetting(&stop, &ended, 5), operations);
    assert_eq!(
        resets, 2,
        "one reset per 5 ended operations, none before them"
    );
    Ok(())
}
