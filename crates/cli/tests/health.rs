//! `pgstack health`, run as the real binary against real servers: the
//! exit code tells healthy (0), degraded (1) and unhealthy (2).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::*;

use std::io::{BufRead as _, BufReader};
use std::process::Stdio;

use pgstack_tests::{TestCluster, TestDb};

#[tokio::test]
async fn a_healthy_server_exits_0_with_a_json_report_and_probe_figures() {
    let db = TestDb::new().await.unwrap();
    let out = pgstack(&[
        "health",
        "--json",
        "--bench",
        "20",
        "--database-url",
        db.url(),
    ])
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let report = json(&out);
    assert_eq!(report["status"], "healthy");
    assert_eq!(report["nodes"][0]["name"], "primary");
    assert_eq!(report["nodes"][0]["observed_role"], "primary");
    assert_eq!(report["bench"][0]["queries"], 20);
    assert_eq!(report["bench"][0]["errors"], 0);
    assert!(report["bench"][0]["p99_us"].as_u64().unwrap() > 0);

    let out = pgstack(&["health", "--detailed", "--database-url", db.url()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", explain(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("HEALTHY"), "{text}");
    assert!(text.contains("pool: "), "{text}");
    assert!(text.contains("breaker: closed"), "{text}");
}

#[tokio::test]
async fn a_stopped_replica_makes_the_cluster_degraded_with_exit_1() {
    let primary = TestCluster::start().await.unwrap();
    let replica = primary.replica().await.unwrap();
    replica.stop().await.unwrap();

    let out = pgstack(&["health", "--json", "--timeout", "30s"])
        .env("DATABASE_URL", primary.url("postgres"))
        .env("DATABASE_REPLICA_URLS", replica.url("postgres"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", explain(&out));
    let report = json(&out);
    assert_eq!(report["status"], "degraded");
    let replica_node = report["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["configured_role"] == "replica")
        .unwrap();
    assert_eq!(replica_node["reachable"], false, "{replica_node}");
}

#[test]
fn an_unreachable_primary_exits_2_without_showing_the_password() {
    // Port 1 on loopback: nothing listens, the connection is refused at once.
    let out = pgstack(&[
        "health",
        "--timeout",
        "10s",
        "--database-url",
        "postgres://app:pw-not-shown@127.0.0.1:1/app",
    ])
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", explain(&out));
    let all = explain(&out);
    assert!(all.contains("UNHEALTHY: cannot reach the primary"), "{all}");
    assert!(!all.contains("pw-not-shown"), "the password leaked: {all}");

    let out = pgstack(&[
        "health",
        "--json",
        "--timeout",
        "10s",
        "--database-url",
        "postgres://app:pw-not-shown@127.0.0.1:1/app",
    ])
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", explain(&out));
    assert_eq!(json(&out)["status"], "unhealthy");
    assert!(!explain(&out).contains("pw-not-shown"));
}

#[tokio::test]
async fn watch_prints_a_report_per_interval() {
    let db = TestDb::new().await.unwrap();
    let mut child = pgstack(&[
        "health",
        "--json",
        "--watch",
        "1",
        "--database-url",
        db.url(),
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut rounds = Vec::new();
    for _ in 0..3 {
        let line = lines.next().expect("the watch ended early").unwrap();
        let report: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(report["status"], "healthy");
        rounds.push(report["round"].as_u64().unwrap());
    }
    child.kill().unwrap();
    let _ = child.wait();
    assert!(
        rounds.windows(2).all(|w| w[1] > w[0]),
        "rounds did not advance: {rounds:?}"
    );
}
