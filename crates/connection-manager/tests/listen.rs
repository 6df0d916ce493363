//! LISTEN/NOTIFY against real servers: notifications, channel names that
//! need quoting, odd payloads, a restart in the middle (the gap reported),
//! a listener dropped while it re-connects, and shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;

use std::time::Duration;

use pgstack_connection::{Cluster, Error, Listener, ListenerEvent, Notification};
use pgstack_tests::{TestCluster, TestDb};

const WAIT: Duration = Duration::from_secs(30);

async fn next(listener: &mut Listener) -> ListenerEvent {
    tokio::time::timeout(WAIT, listener.recv())
        .await
        .expect("an event in time")
        .expect("the listener runs")
}

async fn next_notification(listener: &mut Listener) -> Notification {
    match next(listener).await {
        ListenerEvent::Notification(n) => n,
        other => panic!("expected a notification, got {other:?}"),
    }
}

/// Nothing arrives for a moment.
async fn quiet(listener: &mut Listener) {
    if let Ok(event) = tokio::time::timeout(Duration::from_millis(300), listener.recv()).await {
        panic!("expected nothing, got {event:?}");
    }
}

async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let until = tokio::time::Instant::now() + WAIT;
    while !condition() {
        assert!(tokio::time::Instant::now() < until, "{what}: not in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_notification_reaches_the_listener_with_its_channel_payload_and_sender() {
    let db = TestDb::new().await.unwrap();
    let cluster = Cluster::connect(&common::config(db.url())).await.unwrap();
    let mut listener = cluster.listener(["bills", "payments"]).await.unwrap();
    assert_eq!(cluster.listeners(), 1);
    cluster.notify("bills", "42").await.unwrap();
    cluster.notify("payments", "").await.unwrap();
    cluster.notify("elsewhere", "not for us").await.unwrap();
    let first = next_notification(&mut listener).await;
    assert_eq!(
        (first.channel.as_str(), first.payload.as_str()),
        ("bills", "42")
    );
    assert!(first.process_id > 0);
    let second = next_notification(&mut listener).await;
    assert_eq!(
        (second.channel.as_str(), second.payload.as_str()),
        ("payments", "")
    );
    quiet(&mut listener).await;
    drop(listener);
    wait_until("the task ends", || cluster.listeners() == 0).await;
    cluster.close(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn channel_names_are_taken_exactly_as_given_however_odd() {
    let db = TestDb::new().await.unwrap();
    let cluster = Cluster::connect(&common::config(db.url())).await.unwrap();
    let odd = "Orders \"EU\"; DROP TABLE x; --";
    let mut listener = cluster.listener([odd, "ünïcødé ✓"]).await.unwrap();
    cluster
        .notify("orders \"eu\"; drop table x; --", "other case")
        .await
        .unwrap();
    cluster.notify(odd, "exact").await.unwrap();
    cluster.notify("ünïcødé ✓", "too").await.unwrap();
    let n = next_notification(&mut listener).await;
    assert_eq!((n.channel.as_str(), n.payload.as_str()), (odd, "exact"));
    let n = next_notification(&mut listener).await;
    assert_eq!(n.channel, "ünïcødé ✓");

    // Names PostgreSQL would cut short or refuse are refused here, saying why.
    let long = "x".repeat(64);
    for bad in ["", long.as_str(), "nul\0inside"] {
        match cluster.listener([bad]).await {
            Err(Error::Usage { problem, .. }) => assert!(problem.contains("channel"), "{problem}"),
            other => panic!("{bad:?}: expected a refusal, got {other:?}"),
        }
        assert!(matches!(
            cluster.notify(bad, "x").await,
            Err(Error::Usage { .. })
        ));
        assert!(matches!(
            listener.listen(bad).await,
            Err(Error::Usage { .. })
        ));
    }
    // 63 bytes is the longest name kept whole.
    let longest = "y".repeat(63);
    listener.listen(&longest).await.unwrap();
    cluster.notify(&longest, "fits").await.unwrap();
    assert_eq!(next_notification(&mut listener).await.channel, longest);
    cluster.close(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn odd_and_oversized_payloads_are_sent_as_parameters_or_refused_by_the_server() {
    let db = TestDb::new().await.unwrap();
    let cluster = Cluster::connect(&common::config(db.url())).await.unwrap();
    let mut listener = cluster.listener(["c"]).await.unwrap();
    for payload in [
        "'); SELECT pg_sleep(10); --",
        "$$ dollar $$",
        "line\nbreak\ttab",
        "emoji 🎉",
    ] {
        cluster.notify("c", payload).await.unwrap();
        assert_eq!(next_notification(&mut listener).await.payload, payload);
    }
    // The largest payload PostgreSQL takes is 7999 bytes.
    let biggest = "p".repeat(7999);
    cluster.notify("c", &biggest).await.unwrap();
    assert_eq!(next_notification(&mut listener).await.payload.len(), 7999);
    let error = cluster.notify("c", &"p".repeat(8000)).await.unwrap_err();
    assert_eq!(error.code(), Some("22023"), "{error}");
    let error = cluster.notify("c", &"p".repeat(1 << 20)).await.unwrap_err();
    assert_eq!(error.code(), Some("22023"), "{error}");
    // A NUL cannot be in a text value.
    let error = cluster.notify("c", "a\0b").await.unwrap_err();
    assert!(error.code().is_some_and(|c| c.starts_with("22")), "{error}");
    quiet(&mut listener).await;
    // The listener is fine after all that.
    cluster.notify("c", "still here").await.unwrap();
    assert_eq!(next_notification(&mut listener).await.payload, "still here");
    cluster.close(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn channels_can_be_added_and_removed_later() {
    let db = TestDb::new().await.unwrap();
    let cluster = Cluster::connect(&common::config(db.url())).await.unwrap();
    let no_channels: [&str; 0] = [];
    let mut listener = cluster.listener(no_channels).await.unwrap();
    cluster.notify("a", "before").await.unwrap();
    quiet(&mut listener).await;
    listener.listen("a").await.unwrap();
    listener.listen("b").await.unwrap();
    cluster.notify("a", "1").await.unwrap();
    assert_eq!(next_notification(&mut listener).await.payload, "1");
    listener.unlisten("a").await.unwrap();
    cluster.notify("a", "2").await.unwrap();
    cluster.notify("b", "3").await.unwrap();
    let n = next_notification(&mut listener).await;
    assert_eq!((n.channel.as_str(), n.payload.as_str()), ("b", "3"));
    cluster.close(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn after_a_restart_the_listener_is_back_on_every_channel_and_reports_the_gap() {
    let server = TestCluster::start().await.unwrap();
    let db = TestDb::on(&server).await.unwrap();
    let cluster = Cluster::connect(&common::config(db.url())).await.unwrap();
    let mut listener = cluster.listener(["jobs"]).await.unwrap();
    cluster.notify("jobs", "before").await.unwrap();
    assert_eq!(next_notification(&mut listener).await.payload, "before");

    server.restart().await.unwrap();
    // A channel added while the connection is down is listened on once it
    // is back.
    listener.listen("late").await.unwrap();
    let down_for = match next(&mut listener).await {
        ListenerEvent::Reconnected { node, down_for } => {
            assert_eq!(&*node, "primary");
            down_for
        }
        other => panic!("expected the gap to be reported, got {other:?}"),
    };
    assert!(down_for > Duration::ZERO);
    eprintln!("listener was down for {down_for:?}");

    // Sent after the restart: received, on both channels.
    let sent = async {
        loop {
            match cluster.notify("jobs", "after").await {
                Ok(()) => return,
                Err(e) => {
                    eprintln!("notify while the pool re-connects: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    };
    tokio::time::timeout(WAIT, sent).await.unwrap();
    assert_eq!(next_notification(&mut listener).await.payload, "after");
    cluster.notify("late", "too").await.unwrap();
    assert_eq!(next_notification(&mut listener).await.channel, "late");
    cluster.close(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_listener_dropped_while_it_reconnects_ends_its_task() {
    let server = TestCluster::start().await.unwrap();
    let db = TestDb::on(&server).await.unwrap();
    let cluster = Cluster::connect(&common::config(db.url())).await.unwrap();
    let listener = cluster.listener(["jobs"]).await.unwrap();
    server.stop().await.unwrap();
    // Let it fail a few re-connections.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(cluster.listeners(), 1);
    drop(listener);
    wait_until("the re-connecting task ends", || cluster.listeners() == 0).await;
    server.start_again().await.unwrap();
    // Nobody listens on the server any more.
    let client = server.client(db.name()).await.unwrap();
    let listening: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(listening, 0);
    cluster.close(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn closing_the_cluster_ends_listeners_cleanly() {
    let db = TestDb::new().await.unwrap();
    let cluster = Cluster::connect(&common::config(db.url())).await.unwrap();
    let mut listener = cluster.listener(["c"]).await.unwrap();
    cluster.notify("c", "last").await.unwrap();
    // Received before the close: still handed over.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let report = cluster.close(Duration::from_secs(5)).await;
    assert_eq!(report.cut_off, 0);
    assert_eq!(next_notification(&mut listener).await.payload, "last");
    match tokio::time::timeout(WAIT, listener.recv()).await.unwrap() {
        Err(Error::ShuttingDown { .. }) => {}
        other => panic!("expected the end, got {other:?}"),
    }
    assert_eq!(cluster.listeners(), 0);
    assert!(matches!(
        listener.listen("d").await,
        Err(Error::ShuttingDown { .. })
    ));
    assert!(matches!(
        cluster.listener(["c"]).await,
        Err(Error::ShuttingDown { .. })
    ));
}

#[tokio::test]
async fn a_listener_whose_caller_falls_behind_reports_what_it_dropped() {
    let db = TestDb::new().await.unwrap();
    let cluster = Cluster::connect(&common::config(db.url())).await.unwrap();
    let mut listener = cluster.listener(["flood"]).await.unwrap();
    // 10 000 are kept; send more in one statement, unread.
    cluster
        .execute(
            "flood",
            pgstack_connection::Route::Write,
            "SELECT pg_notify('flood', g::text) FROM generate_series(1, 10500) g",
            &[],
        )
        .await
        .unwrap();
    // Wait until the listener has seen them all.
    tokio::time::sleep(Duration::from_secs(1)).await;
    match next(&mut listener).await {
        ListenerEvent::Lagged { missed } => assert_eq!(missed, 500),
        other => panic!("expected a lag report, got {other:?}"),
    }
    assert_eq!(next_notification(&mut listener).await.payload, "1");
    cluster.close(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn after_a_failover_the_listener_follows_the_new_primary() {
    let pair = common::Pair::start().await;
    let cluster = Cluster::connect(&pair.config()).await.unwrap();
    let mut listener = cluster.listener(["jobs"]).await.unwrap();
    cluster.notify("jobs", "before").await.unwrap();
    assert_eq!(next_notification(&mut listener).await.payload, "before");

    // The primary goes away for good; the replica is promoted.
    pair.primary.stop().await.unwrap();
    pair.replica.promote().await.unwrap();
    match next(&mut listener).await {
        ListenerEvent::Reconnected { node, down_for } => {
            assert_eq!(&*node, "replica-1");
            eprintln!("listener moved to the new primary after {down_for:?}");
        }
        other => panic!("expected the move to be reported, got {other:?}"),
    }
    let sent = async {
        loop {
            match cluster.notify("jobs", "after").await {
                Ok(()) => return,
                Err(e) => {
                    eprintln!("notify during the failover: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    };
    tokio::time::timeout(WAIT, sent).await.unwrap();
    assert_eq!(next_notification(&mut listener).await.payload, "after");
    cluster.close(Duration::from_secs(5)).await;
}
