//! A database that cannot be reached: every command says the cause first, then
//! the fix, in one sentence, never the driver's chain three times.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{explain, pgstack, stderr, stdout};
use pgstack_tests::TestCluster;

/// `pgstack ARGS` against `url`, from an empty folder with one migration.
fn run(url: &str, args: &[&str]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("migrations")).unwrap();
    std::fs::write(dir.path().join("migrations/0001_a.up.sql"), "SELECT 1;").unwrap();
    pgstack(args)
        .current_dir(dir.path())
        .env("DATABASE_URL", url)
        .env("APP_ENV", "test")
        .env("PGSTACK_POOL__CONNECT_TIMEOUT", "1s")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_names_the_cause_first() {
    let server = TestCluster::start().await.unwrap();
    let missing = server.url("no_such_db");
    let port = server.port();
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let refused = format!("postgres://postgres@127.0.0.1:{closed}/app");
    let cases = [
        (
            missing.as_str(),
            format!("database \"no_such_db\" does not exist on 127.0.0.1:{port}; create it"),
        ),
        (
            refused.as_str(),
            format!("nothing listens on 127.0.0.1:{closed} (connection refused); start PostgreSQL"),
        ),
    ];
    for (url, cause) in &cases {
        for args in [
            &["migrate", "status"][..],
            &["migrate", "up"][..],
            &["health"][..],
            &["doctor"][..],
        ] {
            let out = run(url, args);
            assert!(!out.status.success(), "{args:?}: {}", explain(&out));
            let text = format!("{}{}", stdout(&out), stderr(&out));
            let first = text
                .lines()
                .find(|l| l.contains(cause.split(';').next().unwrap_or_default()))
                .unwrap_or_else(|| panic!("{args:?}: no line with the cause: {}", explain(&out)));
            // The cause leads its line (after a label such as `error:` or
            // `primary:`), and is said once.
            let at = first.find(cause.as_str()).unwrap_or_else(|| {
                panic!(
                    "{args:?}: the cause and its fix {cause:?}: {}",
                    explain(&out)
                )
            });
            assert!(at < 30, "{args:?}: the cause first: {first}");
            let head = cause.split(';').next().unwrap_or_default();
            assert_eq!(text.matches(head).count(), 1, "{args:?}: said once: {text}");
        }
    }
}
