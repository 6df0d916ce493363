//! Behind a real PgBouncer in transaction pooling mode, with
//! `query.prepared_statements = false`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use pgstack_connection::Queryable as _;
use pgstack_connection::{Cluster, Route};
use pgstack_tests::{TestCluster, TestDb};

/// A PgBouncer process in front of one server; killed on drop.
struct Bouncer {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pgbouncer_binary() -> Option<PathBuf> {
    ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl Bouncer {
    async fn start(binary: &Path, server_port: u16) -> Bouncer {
        let dir = tempfile::tempdir().unwrap();
        // PgBouncer refuses to run as root: it runs as `postgres` (like the
        // test kit's servers), which must be able to write its log.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let port = free_port();
        let ini = dir.path().join("pgbouncer.ini");
        // With trust, PgBouncer still wants the user listed.
        let users = dir.path().join("users.txt");
        std::fs::write(&users, "\"postgres\" \"\"\n").unwrap();
        std::fs::write(
            &ini,
            format!(
                "[databases]\n\
                 * = host=127.0.0.1 port={server_port}\n\
                 [pgbouncer]\n\
                 listen_addr = 127.0.0.1\n\
                 listen_port = {port}\n\
                 unix_socket_dir =\n\
                 auth_type = trust\n\
                 auth_file = {users}\n\
                 pool_mode = transaction\n\
                 default_pool_size = 3\n\
                 max_client_conn = 200\n\
                 server_reset_query =\n\
                 ignore_startup_parameters = extra_float_digits,options\n\
                 logfile = {log}\n\
                 pidfile = {pid}\n",
                users = users.display(),
                log = dir.path().join("pgbouncer.log").display(),
                pid = dir.path().join("pgbouncer.pid").display(),
            ),
        )
        .unwrap();
        let mut command = Command::new(binary);
        if is_root() {
            command.args(["-u", "postgres"]);
        }
        let child = command
            .arg(&ini)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let bouncer = Bouncer { child, port, dir };
        let up = common::eventually(Duration::from_secs(10), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await;
        assert!(up, "pgbouncer did not start: {}", bouncer.log());
        bouncer
    }

    fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pgbouncer.log")).unwrap_or_default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_query_api_works_behind_pgbouncer_in_transaction_mode() {
    let Some(binary) = pgbouncer_binary() else {
        panic!("pgbouncer is not installed: apt-get install pgbouncer (CI installs it)");
    };
    let server = TestCluster::start().await.unwrap();
    let db = TestDb::on(&server).await.unwrap();
    db.client()
        .await
        .unwrap()
        .batch_execute("CREATE TABLE items (id bigint PRIMARY KEY, name text, price float8)")
        .await
        .unwrap();
    let bouncer = Bouncer::start(&binary, server.port()).await;

    let mut config = common::config(&bouncer.url(db.name()));
    config.query.prepared_statements = false;
    // PgBouncer does not pass `options` on; set statement_timeout on the
    // server or the role instead.
    config.query.statement_timeout = None;
    config.pool.max_size = 12;
    let cluster = Cluster::connect(&config).await.unwrap();

    // Parameterized statements from many tasks at once: server connections
    // are handed between clients after every statement.
    let mut tasks = Vec::new();
    for task in 0..16_i64 {
        let cluster = cluster.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..50_i64 {
                let id = task * 1000 + i;
                let name = format!("item-{id}");
                let price = id as f64 / 4.0;
                let n = cluster
                    .execute(
                        "add-item",
                        Route::Write,
                        "INSERT INTO items (id, name, price) VALUES ($1, $2, $3)",
                        &[&id, &name, &price],
                    )
                    .await
                    .unwrap();
                assert_eq!(n, 1);
                let row = cluster
                    .query_one(
                        "get-item",
                        Route::Read,
                        "SELECT name, price FROM items WHERE id = $1",
                        &[&id],
                    )
                    .await
                    .unwrap();
                assert_eq!(row.get::<_, String>(0), name);
                assert_eq!(row.get::<_, f64>(1), price);
                let none = cluster
                    .query_opt(
                        "find-item",
                        Route::Read,
                        "SELECT id FROM items WHERE id = $1 AND name = $2",
                        &[&id, &"other"],
                    )
                    .await
                    .unwrap();
                assert!(none.is_none());
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }

    // Transactions, with parameters, commit and roll back.
    cluster
        .transaction("rename", async |tx| {
            tx.execute(
                "UPDATE items SET name = $1 WHERE id = $2",
                &[&"renamed", &1_i64],
            )
            .await?;
            let row = tx
                .query_one("SELECT name FROM items WHERE id = $1", &[&1_i64])
                .await?;
            assert_eq!(row.get::<_, &str>(0), "renamed");
            Ok::<_, pgstack_connection::Error>(())
        })
        .await
        .unwrap();
    let _ = cluster
        .transaction("undone", async |tx| {
            tx.execute("DELETE FROM items WHERE id = $1", &[&2_i64])
                .await?;
            Err::<(), _>(pgstack_connection::Error::abort("changed my mind"))
        })
        .await
        .unwrap_err();
    let count: i64 = cluster
        .query_one("count", Route::Read, "SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 16 * 50);

    // Closures and raw connections use the unnamed statement too.
    let names: Vec<String> = cluster
        .read("names", async |conn| {
            let rows = conn
                .query(
                    "SELECT name FROM items WHERE id = ANY($1) ORDER BY id",
                    &[&vec![1_i64, 3]],
                )
                .await?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
        .await
        .unwrap();
    assert_eq!(names, ["renamed", "item-3"]);

    // One failure: the transaction the test aborted.
    let metrics = cluster.metrics();
    assert_eq!(metrics.failures, 1, "{metrics:?}");
    let log = bouncer.log();
    assert!(
        !log.contains("does not exist"),
        "PgBouncer saw missing prepared statements:\n{log}"
    );
    // The same workload with named prepared statements is what breaks
    // behind transaction pooling; make sure the test would notice.
    let mut named = config.clone();
    named.query.prepared_statements = true;
    let broken = Cluster::connect(&named).await.unwrap();
    let mut failures = 0;
    let mut handles = Vec::new();
    for task in 0..8_i64 {
        let broken = broken.clone();
        handles.push(tokio::spawn(async move {
            let mut failed = 0;
            for i in 0..20_i64 {
                let q = format!("SELECT $1::bigint + {task} * 0 + {i} * 0");
                if broken
                    .query_one("named", Route::Read, &q, &[&i])
                    .await
                    .is_err()
                {
                    failed += 1;
                }
            }
            failed
        }));
    }
    for handle in handles {
        failures += handle.await.unwrap();
    }
    eprintln!("with named prepared statements behind PgBouncer: {failures} of 160 failed");
    assert!(
        failures > 0,
        "named prepared statements should break behind transaction pooling; \
         the setup no longer reproduces the problem this test guards against"
    );
}
