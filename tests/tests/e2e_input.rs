#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]
//! Bad input, through `pgstack::Database`: a table of cases, each expecting
//! a clear error and no change (no session opened, no schema touched), and
//! never the password in the error, its `Debug` or the logs. Then what a
//! running `Database` shows about itself (`Debug`, status, metrics, health,
//! the shutdown report): no password either.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Figures, PASSWORD};
use pgstack::migrations::{DownTarget, Migrator};
use pgstack::{Database, StartError};
use pgstack_tests::{TestCluster, TestDb};

/// Sessions connected to `database` now (ours and anyone's).
async fn sessions_on(client: &tokio_postgres::Client, database: &str) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            &[&database],
        )
        .await
        .unwrap()
        .get(0)
}

/// Tables in the public schema of the database `client` is on.
async fn tables(client: &tokio_postgres::Client) -> Vec<String> {
    client
        .query(
            "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// One bad-configuration case: environment variables, an optional
/// `pgstack.toml`, and the texts the error must contain.
struct Case {
    name: &'static str,
    env: Vec<(&'static str, String)>,
    file: Option<String>,
    expect: &'static [&'static str],
}

/// A bad migrations folder: its name, its files, what the error must say.
type MigrationCase = (&'static str, Vec<(String, String)>, &'static [&'static str]);

fn write_folder(dir: &Path, files: &[(&str, &str)]) {
    std::fs::create_dir_all(dir).unwrap();
    for (name, body) in files {
        std::fs::write(dir.join(name), body).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_fails_with_a_clear_error_and_changes_nothing() {
    common::capture_logs();
    let started = Instant::now();
    let server = TestCluster::start().await.unwrap();
    let tdb = TestDb::on(&server).await.unwrap();
    let admin = server.client("postgres").await.unwrap();
    let url = common::with_password(tdb.url());
    let port = server.port();
    let db = tdb.name().to_owned();
    let good = || ("DATABASE_URL", url.clone());
    let test_env = || ("APP_ENV", "test".to_owned());
    let no_migrations = || ("PGSTACK_MIGRATIONS__AUTO_MIGRATE", "false".to_owned());

    let cases =
        vec![
        Case {
            name: "DATABASE_URL with a port that is not a number",
            env: vec![
                test_env(),
                (
                    "DATABASE_URL",
                    format!("postgres://app:{PASSWORD}@127.0.0.1:fivefourthree/{db}"),
                ),
            ],
            file: None,
            expect: &["DATABASE_URL"],
        },
        Case {
            name: "DATABASE_URL with another scheme",
            env: vec![
                test_env(),
                (
                    "DATABASE_URL",
                    format!("mysql://app:{PASSWORD}@127.0.0.1:{port}/{db}"),
                ),
            ],
            file: None,
            expect: &["DATABASE_URL", "postgres://"],
        },
        Case {
            name: "DATABASE_URL that is not a URL",
            env: vec![
                test_env(),
                ("DATABASE_URL", format!("host=127.0.0.1 password={PASSWORD}")),
            ],
            file: None,
            expect: &["DATABASE_URL"],
        },
        Case {
            name: "DATABASE_URL with a port out of range",
            env: vec![
                test_env(),
                (
                    "DATABASE_URL",
                    format!("postgres://app:{PASSWORD}@127.0.0.1:99999/{db}"),
                ),
            ],
            file: None,
            expect: &["DATABASE_URL"],
        },
        Case {
            name: "unknown environment",
            env: vec![("APP_ENV", "prod-eu".to_owned()), good()],
            file: None,
            expect: &["prod-eu", "development, test, staging, production"],
        },
        Case {
            name: "pgstack.toml: a number given as text",
            env: vec![test_env(), good()],
            file: Some("[default]\npool.max_size = \"lots\"\n".to_owned()),
            expect: &["pool.max_size", "pgstack.toml:2"],
        },
        Case {
            name: "pgstack.toml: an unknown key",
            env: vec![test_env(), good()],
            file: Some("[default]\npool.max_szie = 3\n".to_owned()),
            expect: &["pool.max_szie", "did you mean pool.max_size"],
        },
        Case {
            name: "pgstack.toml: min_idle above max_size",
            env: vec![test_env(), good()],
            file: Some("[default]\npool.min_idle = 60\npool.max_size = 10\n".to_owned()),
            expect: &["pool.min_idle", "must not exceed pool.max_size"],
        },
        Case {
            name: "pgstack.toml: a pool of zero connections",
            env: vec![test_env(), good()],
            file: Some("[default]\npool.min_idle = 0\npool.max_size = 0\n".to_owned()),
            expect: &["pool.max_size = 0"],
        },
        Case {
            name: "pgstack.toml: a zero acquire timeout",
            env: vec![test_env(), good()],
            file: Some("[default]\npool.acquire_timeout = \"0s\"\n".to_owned()),
            expect: &["pool.acquire_timeout"],
        },
        Case {
            name: "TLS: a root certificate that does not exist",
            env: vec![test_env(), good()],
            file: Some(
                "[default]\ntls.mode = \"verify-full\"\ntls.root_cert = \"/nonexistent/ca.pem\"\n"
                    .to_owned(),
            ),
            expect: &["tls.root_cert", "/nonexistent/ca.pem"],
        },
        Case {
            name: "TLS: an unknown mode",
            env: vec![test_env(), good(), ("DB_SSLMODE", "sometimes".to_owned())],
            file: None,
            expect: &["sometimes", "verify-full"],
        },
        Case {
            name: "TLS: production without TLS",
            env: vec![
                ("APP_ENV", "production".to_owned()),
                good(),
                ("DB_SSLMODE", "disable".to_owned()),
            ],
            file: None,
            expect: &["production requires TLS"],
        },
        Case {
            name: "TLS: required by the client, not offered by the server",
            env: vec![
                test_env(),
                good(),
                no_migrations(),
                ("DB_SSLMODE", "require".to_owned()),
            ],
            file: None,
            expect: &["does not offer TLS, and tls.mode asks for it", "DB_SSLMODE"],
        },
    ];

    let folder = tempfile::tempdir().unwrap();
    let before = sessions_on(&admin, &db).await;
    let mut rows = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let mut builder = Database::builder().env_source(case.env.clone());
        if let Some(text) = &case.file {
            let path = folder.path().join(format!("{i}/pgstack.toml"));
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, text).unwrap();
            builder = builder.file(path);
        }
        let result = builder.connect().await;
        let error = match result {
            Ok(db) => {
                db.shutdown(Duration::ZERO).await;
                panic!("{}: connected", case.name);
            }
            Err(error) => error,
        };
        let text = common::checked(&error);
        for expected in case.expect {
            assert!(
                text.contains(expected),
                "{}: the error says {expected:?}: {text}",
                case.name
            );
        }
        if case.name.starts_with("TLS: required") {
            assert!(matches!(error, StartError::Unreachable { .. }), "{text}");
        } else {
            assert!(
                matches!(error, StartError::Config(_)),
                "{}: {text}",
                case.name
            );
        }
        rows.push(format!("{}: {text}", case.name));
        // No change: no session of anyone's was left on the database.
        assert_eq!(sessions_on(&admin, &db).await, before, "{}", case.name);
    }
    for row in &rows {
        eprintln!("bad input — {row}");
    }
    assert!(tables(&tdb.client().await.unwrap()).await.is_empty());
    common::assert_no_password_in_logs();
    let mut figures = Figures::new("bad input: configuration", started);
    figures.operations = cases.len() as u64;
    figures.faults = cases.len() as u64;
    figures.errors = rows.len() as u64;
    figures.report();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_migration_folders_fail_with_a_clear_error_and_change_nothing() {
    common::capture_logs();
    let started = Instant::now();
    let server = TestCluster::start().await.unwrap();
    let folder = tempfile::tempdir().unwrap();
    let create = |name: &str| format!("CREATE TABLE {name} (id int);");
    let cases: Vec<MigrationCase> = vec![
        (
            "a gap in the versions",
            vec![
                ("0001_a.up.sql".into(), create("gap_a")),
                ("0003_c.up.sql".into(), create("gap_c")),
            ],
            &["version 2 is missing"],
        ),
        (
            "a duplicate version",
            vec![
                ("0001_a.up.sql".into(), create("dup_a")),
                ("0001_b.up.sql".into(), create("dup_b")),
            ],
            &["0001_a.up.sql", "0001_b.up.sql"],
        ),
        (
            "invalid SQL",
            vec![(
                "0001_bad.up.sql".into(),
                "CREATE TABLE bad_a (id int);\nCREATE TABLBE bad_b (id int);\n".into(),
            )],
            &["0001_bad.up.sql", "line 2", "TABLBE"],
        ),
    ];
    let mut errors = 0;
    for (i, (name, files, expect)) in cases.iter().enumerate() {
        let tdb = TestDb::on(&server).await.unwrap();
        let dir = folder.path().join(i.to_string());
        let files: Vec<(&str, &str)> = files
            .iter()
            .map(|(n, b)| (n.as_str(), b.as_str()))
            .collect();
        write_folder(&dir, &files);
        let mut config = common::config(tdb.url());
        config.migrations.auto_migrate = true;
        config.migrations.dir = dir;
        let error = match Database::builder().config(config).connect().await {
            Ok(_) => panic!("{name}: started"),
            Err(error) => error,
        };
        errors += 1;
        let text = common::checked(&error);
        assert!(matches!(error, StartError::Migrations(_)), "{name}: {text}");
        for expected in *expect {
            assert!(text.contains(expected), "{name}: says {expected:?}: {text}");
        }
        eprintln!("bad input — migrations, {name}: {text}");
        // No change: no table of the migrations, nothing recorded as applied.
        let client = tdb.client().await.unwrap();
        let left: Vec<String> = tables(&client)
            .await
            .into_iter()
            .filter(|t| t != "_sqlx_migrations" && t != "pgstack_metadata")
            .collect();
        assert!(left.is_empty(), "{name}: tables left: {left:?}");
        let applied: i64 = match client
            .query_one("SELECT count(*) FROM _sqlx_migrations WHERE success", &[])
            .await
        {
            Ok(row) => row.get(0),
            Err(_) => 0, // the bookkeeping table was never created
        };
        assert_eq!(applied, 0, "{name}");
    }

    // A down request that needs a missing down file: refused before
    // anything is reverted.
    let tdb = TestDb::on(&server).await.unwrap();
    let dir = folder.path().join("down");
    write_folder(
        &dir,
        &[
            ("0001_a.up.sql", "CREATE TABLE down_a (id int);"),
            ("0001_a.down.sql", "DROP TABLE down_a;"),
            ("0002_b.up.sql", "CREATE TABLE down_b (id int);"),
        ],
    );
    let mut config = common::config(tdb.url());
    config.migrations.auto_migrate = true;
    config.migrations.dir = dir;
    let db = common::connect(config).await;
    assert_eq!(db.status().await.migrations.applied, vec![1, 2]);
    let migrator = Migrator::from_config(db.config()).unwrap();
    let error = migrator.down(DownTarget::Steps(1)).await.unwrap_err();
    errors += 1;
    let text = common::checked(&error);
    assert!(
        matches!(error, pgstack::migrations::Error::MissingDown { .. }),
        "{text}"
    );
    assert!(text.contains("0002"), "{text}");
    eprintln!("bad input — migrations, a missing down file: {text}");
    let client = tdb.client().await.unwrap();
    let left = tables(&client).await;
    assert!(
        left.contains(&"down_a".to_owned()) && left.contains(&"down_b".to_owned()),
        "nothing reverted: {left:?}"
    );
    let versions: Vec<i64> = client
        .query("SELECT version FROM _sqlx_migrations ORDER BY 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions, vec![1, 2], "nothing reverted");
    let migrations = Migrator::from_config(db.config())
        .unwrap()
        .status()
        .await
        .unwrap();
    common::assert_clean("the migration status", &format!("{migrations:?}"));
    db.shutdown(Duration::from_secs(2)).await;
    assert!(db.status().await.migrations.applied == vec![1, 2]);

    common::assert_no_password_in_logs();
    let mut figures = Figures::new("bad input: migrations", started);
    figures.operations = 4;
    figures.faults = 4;
    figures.errors = errors;
    figures.report();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_database_never_shows_the_password() {
    common::capture_logs();
    let server = TestCluster::start().await.unwrap();
    let tdb = TestDb::on(&server).await.unwrap();
    let replica = server.replica().await.unwrap();
    let mut config = common::config(tdb.url());
    config.replicas.push(
        pgstack::config::NodeSettings::from_url(&common::with_password(&replica.url(tdb.name())))
            .unwrap(),
    );
    let db = common::connect(config).await;
    db.query_one("one", pgstack::Route::Read, "SELECT 1", &[])
        .await
        .unwrap();
    let error = db
        .query_one("bad", pgstack::Route::Write, "SELECT * FROM nowhere", &[])
        .await
        .unwrap_err();
    common::checked(&error);
    replica.kill9().await.unwrap();
    let status = db.status().await;
    let health = db.health().await;
    let metrics = db.metrics();
    for (what, text) in [
        ("Database Debug", format!("{db:?}")),
        ("config Debug", format!("{:?}", db.config())),
        ("status Debug", format!("{status:?}")),
        ("health Debug", format!("{health:?}")),
        ("metrics Debug", format!("{metrics:?}")),
        ("status JSON", serde_json_like(&status)),
    ] {
        common::assert_clean(what, &text);
    }
    let report = db.shutdown(Duration::from_secs(2)).await;
    common::assert_clean("shutdown report", &format!("{report:?}"));
    assert!(common::assert_no_password_in_logs() > 0, "logs captured");
}

/// The status as a status page would serialize it (through `Debug` of the
/// serialized form's pieces: no serde_json dependency needed).
fn serde_json_like(status: &pgstack::Status) -> String {
    status
        .nodes
        .iter()
        .map(|n| format!("{} {:?} {:?}", n.name, n.pool, n.problem))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A server on `addr`'s port that is not PostgreSQL: it answers every
/// connection with an HTTP error (`talk`) or says nothing (`!talk`).
async fn not_postgres(talk: bool) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut socket, _)) = listener.accept().await {
            if talk {
                tokio::spawn(async move {
                    // The client's first packet is read before the answer,
                    // and the socket drained until the client closes: a
                    // socket closed with unread data is reset, and the
                    // reset can overtake the answer ("connection reset"
                    // instead of "does not speak the protocol", once in a
                    // CI run).
                    let mut buf = [0_u8; 1024];
                    let _ = socket.read(&mut buf).await;
                    let _ = socket
                        .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                        .await;
                    let _ = socket.shutdown().await;
                    while matches!(socket.read(&mut buf).await, Ok(n) if n > 0) {}
                });
            } else {
                held.push(socket);
            }
        }
    });
    (addr, task)
}

/// A port nothing listens on.
async fn closed_port() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().port()
}

/// An unreachable-database case: its name, the URL, more environment
/// variables, the cause the message starts with, and a word of the fix.
type Unreachable = (
    &'static str,
    String,
    Vec<(&'static str, String)>,
    String,
    &'static str,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_is_explained_cause_first_by_connect_and_migrate() {
    common::capture_logs();
    let server = TestCluster::start().await.unwrap();
    let port = server.port();
    // A role that must give a password (the kit's servers trust everyone
    // else): its line goes first in pg_hba.conf.
    let admin = server.client("postgres").await.unwrap();
    admin
        .batch_execute("CREATE ROLE pw_user LOGIN PASSWORD 'right-password'")
        .await
        .unwrap();
    let hba = server.data_dir().join("pg_hba.conf");
    let rules = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!("host all pw_user 127.0.0.1/32 scram-sha-256\n{rules}"),
    )
    .unwrap();
    admin
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    let (talking, _talking) = not_postgres(true).await;
    let (silent, _silent) = not_postgres(false).await;
    let closed = closed_port().await;

    let cases: Vec<Unreachable> = vec![
        (
            "missing database",
            format!("postgres://postgres:{PASSWORD}@127.0.0.1:{port}/no_such_db"),
            vec![],
            format!("database \"no_such_db\" does not exist on 127.0.0.1:{port}"),
            "createdb",
        ),
        (
            "wrong password",
            format!("postgres://pw_user:{PASSWORD}@127.0.0.1:{port}/postgres"),
            vec![],
            format!("127.0.0.1:{port} refused the password of user \"pw_user\""),
            "DB_PASSWORD",
        ),
        (
            "unknown host",
            format!("postgres://postgres:{PASSWORD}@no-such-host.invalid:{port}/postgres"),
            vec![],
            "the host name \"no-such-host.invalid\" does not resolve".to_owned(),
            "DB_HOST",
        ),
        (
            "closed port",
            format!("postgres://postgres:{PASSWORD}@127.0.0.1:{closed}/postgres"),
            vec![],
            format!("nothing listens on 127.0.0.1:{closed} (connection refused)"),
            "DB_PORT",
        ),
        (
            "TLS required, not offered",
            format!("postgres://postgres:{PASSWORD}@127.0.0.1:{port}/postgres"),
            vec![("DB_SSLMODE", "require".to_owned())],
            format!("127.0.0.1:{port} does not offer TLS, and tls.mode asks for it"),
            "DB_SSLMODE",
        ),
        (
            "not PostgreSQL, answering",
            format!("postgres://postgres:{PASSWORD}@{talking}/postgres"),
            vec![],
            format!("what listens on {talking} does not speak the PostgreSQL protocol"),
            "port",
        ),
        (
            "not PostgreSQL, silent",
            format!("postgres://postgres:{PASSWORD}@{silent}/postgres"),
            vec![],
            format!("{silent} did not answer within 1s"),
            "not PostgreSQL",
        ),
    ];
    for (name, url, extra, cause, fix) in cases {
        let mut env = vec![
            ("APP_ENV", "test".to_owned()),
            ("DATABASE_URL", url),
            ("PGSTACK_MIGRATIONS__AUTO_MIGRATE", "false".to_owned()),
            ("PGSTACK_POOL__CONNECT_TIMEOUT", "1s".to_owned()),
        ];
        env.extend(extra);
        let started = Instant::now();
        let error = match Database::builder().env_source(env.clone()).connect().await {
            Ok(db) => {
                db.shutdown(Duration::ZERO).await;
                panic!("{name}: connected");
            }
            Err(error) => error,
        };
        let text = common::checked(&error);
        assert!(
            matches!(
                error,
                StartError::Unreachable {
                    explanation: Some(_),
                    ..
                }
            ),
            "{name}: {text}"
        );
        assert!(text.starts_with(&cause), "{name}: the cause first: {text}");
        let (said, rest) = text.split_once("; ").unwrap_or((&text, ""));
        assert!(rest.contains(fix), "{name}: the fix says {fix:?}: {text}");
        assert_eq!(text.matches(said).count(), 1, "{name}: said once: {text}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{name}: {text}"
        );
        eprintln!("{name}: connect: {text}");

        // The migrator says the same.
        let config = pgstack::ConfigLoader::new()
            .without_file()
            .env_source(env)
            .load()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        write_folder(dir.path(), &[("0001_a.up.sql", "SELECT 1;")]);
        let migrator = Migrator::new(
            pgstack::migrations::Migrations::from_dir(dir.path()).unwrap(),
            &config.primary,
        )
        .tls(&config.tls)
        .connect_timeout(config.pool.connect_timeout);
        let error = migrator.status().await.unwrap_err();
        let text = common::checked(&error);
        assert!(
            text.starts_with(&cause),
            "{name}: migrate: the cause first: {text}"
        );
        assert!(text.contains(fix), "{name}: migrate: {text}");
        eprintln!("{name}: {text}");
    }
    common::assert_no_password_in_logs();
}
