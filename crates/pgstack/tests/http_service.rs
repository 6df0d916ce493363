#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The HTTP example's endpoints, served from the example's own router and
//! hit with plain HTTP/1.1 requests over TCP: `/healthz` says 200 while the
//! database layer is healthy or degraded and 503 once it is shut down;
//! `/metrics` carries the `pgstack_*` series; a note posted in one request
//! is counted by a read that carries the write's `pgstack-read-after`
//! header, while the replica has not replayed it.

#[path = "../examples/http_service.rs"]
#[allow(dead_code, unreachable_pub)]
mod http_service;

use std::time::Duration;

use metrics_exporter_prometheus::PrometheusBuilder;
use pgstack::{Database, DatabaseConfig, NodeHealth, Route};
use pgstack_tests::TestCluster;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `GET path` on `addr`; the status code and the body.
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let (code, _, body) = request(addr, "GET", path, &[], "").await;
    (code, body)
}

/// `method path` with `headers` and `body` on `addr`; the status code, the
/// response's head and its body.
async fn request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(20),
        stream.read_to_string(&mut response),
    )
    .await
    .unwrap()
    .unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap();
    (code, head.to_owned(), body.to_owned())
}

/// The value of header `name` in a response head.
fn header<'h>(head: &'h str, name: &str) -> Option<&'h str> {
    head.lines().find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// `GET /notes/count`, with `token` as the read-after header; the count
/// and whether a replica answered.
async fn count_notes(addr: std::net::SocketAddr, token: Option<&str>) -> (i64, bool) {
    let headers: Vec<(&str, &str)> = token
        .map(|t| vec![(http_service::READ_AFTER_HEADER, t)])
        .unwrap_or_default();
    let (code, _, body) = request(addr, "GET", "/notes/count", &headers, "").await;
    assert_eq!(code, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    (
        answer["count"].as_i64().unwrap(),
        answer["from_replica"].as_bool().unwrap(),
    )
}

#[tokio::test]
async fn healthz_and_metrics() {
    let prometheus = PrometheusBuilder::new().install_recorder().unwrap();
    let cluster = TestCluster::start().await.unwrap();
    let replica = cluster.replica().await.unwrap();
    let mut config = DatabaseConfig::for_tests(&cluster.url("postgres")).unwrap();
    config
        .replicas
        .push(pgstack::config::NodeSettings::from_url(&replica.url("postgres")).unwrap());
    config.migrations.auto_migrate = false;
    config.pool.connect_timeout = Duration::from_secs(2);
    config.health.probe_timeout = Duration::from_secs(1);
    config.health.interval = Duration::from_secs(1);
    let db = Database::builder().config(config).connect().await.unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = http_service::router(db.clone(), prometheus);
    tokio::spawn(async move { axum::serve(listener, app).await });

    // Healthy.
    let (code, body) = get(addr, "/healthz").await;
    assert_eq!(code, 200, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "healthy", "{body}");
    assert_eq!(health["state"], "ready", "{body}");
    assert_eq!(health["nodes"].as_array().unwrap().len(), 2, "{body}");

    // A query through the example's route, then its series in /metrics.
    let (code, now) = get(addr, "/now").await;
    assert_eq!(code, 200, "{now}");
    assert!(now.contains(':'), "{now}");
    db.query("http-test", Route::Write, "SELECT 1", &[])
        .await
        .unwrap();
    let (code, text) = get(addr, "/metrics").await;
    assert_eq!(code, 200);
    assert!(text.contains("pgstack_queries_total"), "{text}");
    assert!(text.contains("op=\"http-now\""), "{text}");
    assert!(text.contains("pgstack_up 1"), "{text}");

    // Read your writes across requests: with the replica's replay paused,
    // a read without the header may miss the note; with it, never.
    http_service::create_schema(&db).await.unwrap();
    replica.wait_for_replay().await.unwrap();
    replica.pause_replay().await.unwrap();
    let (code, head, body) = request(addr, "POST", "/notes", &[], "hello").await;
    assert_eq!(code, 201, "{body}");
    let token = header(&head, http_service::READ_AFTER_HEADER)
        .unwrap_or_else(|| panic!("no read-after header: {head}"))
        .to_owned();
    assert!(token.starts_with("pgstack-lsn:"), "{token}");
    let (count, from_replica) = count_notes(addr, Some(&token)).await;
    assert_eq!((count, from_replica), (1, false), "the primary answers");
    let (count, from_replica) = count_notes(addr, None).await;
    assert_eq!(
        (count, from_replica),
        (0, true),
        "the paused replica misses it"
    );
    // Replayed: the replica answers the read that carries the header.
    replica.resume_replay().await.unwrap();
    replica.wait_for_replay().await.unwrap();
    let (count, from_replica) = count_notes(addr, Some(&token)).await;
    assert_eq!((count, from_replica), (1, true), "the replica answers");
    let (code, _, body) = request(
        addr,
        "GET",
        "/notes/count",
        &[(http_service::READ_AFTER_HEADER, "pgstack-lsn:nonsense")],
        "",
    )
    .await;
    assert_eq!(code, 400, "{body}");

    // Degraded, still serving: 200 (from the monitor's next round).
    replica.stop().await.unwrap();
    let until = std::time::Instant::now() + Duration::from_secs(10);
    let (code, body, health) = loop {
        let (code, body) = get(addr, "/healthz").await;
        let health: serde_json::Value = serde_json::from_str(&body).unwrap();
        if health["status"] != "healthy" {
            break (code, body, health);
        }
        assert!(std::time::Instant::now() < until, "{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(code, 200, "{body}");
    assert_eq!(health["status"], "degraded", "{body}");
    assert_eq!(health["nodes"][1]["health"], "unhealthy", "{body}");
    assert_eq!(db.health().await.status, NodeHealth::Degraded);
    #[cfg(feature = "health")]
    {
        let report = db.health_report().unwrap();
        assert!(!report.node("replica-1").unwrap().reachable);
    }

    // Shut down: 503, and /now refuses.
    db.shutdown(Duration::from_secs(1)).await;
    let (code, body) = get(addr, "/healthz").await;
    assert_eq!(code, 503, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "unhealthy", "{body}");
    assert_eq!(health["state"], "stopped", "{body}");
    let (code, _) = get(addr, "/now").await;
    assert_eq!(code, 503);
}
