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

/// A `--timeout` shorter than `pool.acquire_timeout` must not hide the
/// cause: the commands with a connection of their own log in once first and
/// say why at once, instead of "gave up after …" or "no answer within …"
/// when the timeout cuts the checkout's wait short.
#[test]
fn a_refused_port_is_explained_at_once_whatever_the_timeout() {
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let url = format!("postgres://postgres@127.0.0.1:{closed}/app");
    let cause = format!("nothing listens on 127.0.0.1:{closed} (connection refused)");
    let dump = tempfile::tempdir().unwrap();
    let output = dump.path().join("app.dump");
    for args in [
        &["doctor", "--timeout", "20s"][..],
        &[
            "backup",
            "--timeout",
            "20s",
            "--output",
            output.to_str().unwrap(),
        ][..],
        &["db-reset", "--timeout", "20s"][..],
    ] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("migrations")).unwrap();
        std::fs::write(dir.path().join("migrations/0001_a.up.sql"), "SELECT 1;").unwrap();
        let started = std::time::Instant::now();
        let out = pgstack(args)
            .current_dir(dir.path())
            .env("DATABASE_URL", &url)
            .env("PGSTACK_POOL__ACQUIRE_TIMEOUT", "60s")
            .output()
            .unwrap();
        let took = started.elapsed();
        assert!(!out.status.success(), "{args:?}: {}", explain(&out));
        let text = format!("{}{}", stdout(&out), stderr(&out));
        assert_eq!(
            text.matches(&cause).count(),
            1,
            "{args:?}: {}",
            explain(&out)
        );
        assert!(!text.contains("--timeout"), "{args:?}: {}", explain(&out));
        assert!(!text.contains("os error"), "{args:?}: said once: {text}");
        // Far below the 20 s `--timeout` (a refused port answers at once).
        assert!(
            took < std::time::Duration::from_secs(10),
            "{args:?}: {took:?}"
        );
    }
}
