//! COPY against a real server: text, CSV and binary in, out as a stream,
//! through the cluster and through a connection; malformed rows, copies
//! abandoned half-way, shutdown; and a million rows beside `psql \copy`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]

mod common;

use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use pgstack_connection::tokio_postgres::types::Type;
use pgstack_connection::{Cluster, Error, Route};
use pgstack_tests::TestDb;

async fn with_table(db: &TestDb) -> Cluster {
    let cluster = Cluster::connect(&common::config(db.url())).await.unwrap();
    cluster
        .execute(
            "create",
            Route::Write,
            "CREATE TABLE items (id bigint PRIMARY KEY, name text NOT NULL, price int)",
            &[],
        )
        .await
        .unwrap();
    cluster
}

async fn count(cluster: &Cluster) -> i64 {
    cluster
        .query_one("count", Route::Write, "SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0)
}

/// The pool hands out a working, idle connection.
async fn pool_is_fine(cluster: &Cluster) {
    let conn = cluster.connection("check", Route::Write).await.unwrap();
    let state: String = conn
        .query_one(
            "SELECT coalesce(state, '') FROM pg_stat_activity WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(state, "active");
    let tx: Option<String> = conn
        .query_one("SELECT txid_current_if_assigned()::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(tx, None);
}

#[tokio::test]
async fn csv_and_text_rows_are_copied_in_and_out() {
    let db = TestDb::new().await.unwrap();
    let cluster = with_table(&db).await;
    let mut copy = cluster
        .copy_in(
            "load",
            "COPY items (id, name, price) FROM STDIN (FORMAT csv)",
        )
        .await
        .unwrap();
    // Pieces need not follow rows.
    copy.send("1,apple,3\n2,\"pear, green\",").await.unwrap();
    copy.send("5\n3,plum,\n").await.unwrap();
    assert_eq!(copy.finish().await.unwrap(), 3);
    let mut text = cluster
        .copy_in("load", "COPY items (id, name) FROM STDIN")
        .await
        .unwrap();
    text.send(&b"4\tfig\n"[..]).await.unwrap();
    assert_eq!(text.finish().await.unwrap(), 1);
    assert_eq!(count(&cluster).await, 4);

    let out: Vec<bytes::Bytes> = cluster
        .copy_out(
            "export",
            Route::Read,
            "COPY (SELECT id, name, price FROM items ORDER BY id) TO STDOUT (FORMAT csv)",
        )
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let csv = String::from_utf8(out.concat()).unwrap();
    assert_eq!(csv, "1,apple,3\n2,\"pear, green\",5\n3,plum,\n4,fig,\n");
    pool_is_fine(&cluster).await;
    cluster.close(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn typed_rows_are_copied_in_binary() {
    let db = TestDb::new().await.unwrap();
    let cluster = with_table(&db).await;
    let mut copy = cluster
        .copy_in_binary(
            "load-binary",
            "COPY items (id, name, price) FROM STDIN (FORMAT binary)",
            &[Type::INT8, Type::TEXT, Type::INT4],
        )
        .await
        .unwrap();
    for id in 0..1000_i64 {
        let price: Option<i32> = (id % 2 == 0).then_some(id as i32);
        copy.write(&[&id, &format!("item {id}"), &price])
            .await
            .unwrap();
    }
    assert_eq!(copy.finish().await.unwrap(), 1000);
    let row = cluster
        .query_one(
            "check",
            Route::Write,
            "SELECT count(*), count(price), max(name) FROM items",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 1000);
    assert_eq!(row.get::<_, i64>(1), 500);
    assert_eq!(row.get::<_, String>(2), "item 999");

    // A value of the wrong type is refused on the client; nothing is kept.
    let mut copy = cluster
        .copy_in_binary(
            "load-binary",
            "COPY items (id, name, price) FROM STDIN (FORMAT binary)",
            &[Type::INT8, Type::TEXT, Type::INT4],
        )
        .await
        .unwrap();
    copy.write(&[&5000_i64, &"ok", &1_i32]).await.unwrap();
    let error = copy
        .write(&[&"not a number", &"x", &1_i32])
        .await
        .unwrap_err();
    assert!(
        matches!(error, Error::Client { .. } | Error::Connection { .. }),
        "{error:?}"
    );
    drop(copy);
    assert_eq!(count(&cluster).await, 1000);
    pool_is_fine(&cluster).await;
    cluster.close(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_malformed_row_fails_the_copy_naming_it_and_nothing_is_committed() {
    let db = TestDb::new().await.unwrap();
    let cluster = with_table(&db).await;
    let mut copy = cluster
        .copy_in(
            "load",
            "COPY items (id, name, price) FROM STDIN (FORMAT csv)",
        )
        .await
        .unwrap();
    let result = async {
        copy.send("1,a,1\n2,b,2\nthree,c,3\n4,d,4\n").await?;
        copy.finish().await
    }
    .await;
    let error = result.unwrap_err();
    assert_eq!(error.code(), Some("22P02"), "{error}");
    let text = error.to_string();
    assert!(text.contains("line 3"), "{text}");
    assert!(text.contains("three"), "{text}");
    assert_eq!(count(&cluster).await, 0);
    // A duplicate key in the data: the same, nothing kept.
    let mut copy = cluster
        .copy_in("load", "COPY items (id, name) FROM STDIN (FORMAT csv)")
        .await
        .unwrap();
    copy.send("7,a\n7,b\n").await.unwrap();
    let error = copy.finish().await.unwrap_err();
    assert!(error.is_unique_violation(), "{error}");
    assert_eq!(count(&cluster).await, 0);
    // Not a COPY at all.
    let error = cluster.copy_in("load", "SELECT 1").await.unwrap_err();
    assert!(matches!(error, Error::Usage { .. }), "{error}");
    pool_is_fine(&cluster).await;
    cluster.close(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_copy_abandoned_half_way_keeps_nothing_and_leaves_the_pool_fine() {
    let db = TestDb::new().await.unwrap();
    let cluster = with_table(&db).await;
    let mut copy = cluster
        .copy_in("load", "COPY items (id, name) FROM STDIN (FORMAT csv)")
        .await
        .unwrap();
    let rows: String = (0..50_000).map(|i| format!("{i},n{i}\n")).collect();
    copy.send(rows).await.unwrap();
    drop(copy);
    assert_eq!(count(&cluster).await, 0);
    pool_is_fine(&cluster).await;

    // A binary one too.
    let mut copy = cluster
        .copy_in_binary(
            "load-binary",
            "COPY items (id, name) FROM STDIN (FORMAT binary)",
            &[Type::INT8, Type::TEXT],
        )
        .await
        .unwrap();
    for id in 0..10_000_i64 {
        copy.write(&[&id, &"x"]).await.unwrap();
    }
    drop(copy);
    assert_eq!(count(&cluster).await, 0);

    // A stream read half-way.
    cluster
        .execute(
            "fill",
            Route::Write,
            "INSERT INTO items SELECT g, repeat('x', 100) FROM generate_series(1, 200000) g",
            &[],
        )
        .await
        .unwrap();
    let mut out = cluster
        .copy_out("export", Route::Write, "COPY items TO STDOUT")
        .await
        .unwrap();
    let mut seen = 0;
    while let Some(chunk) = out.try_next().await.unwrap() {
        seen += chunk.len();
        if seen > 100_000 {
            break;
        }
    }
    drop(out);
    let started = Instant::now();
    pool_is_fine(&cluster).await;
    // Nobody waited for the rest of the data.
    assert!(started.elapsed() < Duration::from_secs(2));
    // The abandoned copy's backend goes away, not left streaming.
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let copying: i64 = cluster
            .query_one(
                "copying",
                Route::Write,
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'COPY items TO%' \
                 AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if copying == 0 {
            break;
        }
        assert!(Instant::now() < until, "the abandoned COPY still runs");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.close(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn copies_run_on_a_connection_of_ones_own_too() {
    let db = TestDb::new().await.unwrap();
    let cluster = with_table(&db).await;
    let mut conn = cluster.connection("bulk", Route::Write).await.unwrap();
    let mut copy = conn
        .copy_in("COPY items (id, name) FROM STDIN (FORMAT csv)")
        .await
        .unwrap();
    copy.send("1,a\n2,b\n").await.unwrap();
    assert_eq!(copy.finish().await.unwrap(), 2);
    // Abandoned on a connection the caller keeps: aborted, the connection
    // stays usable.
    let mut copy = conn
        .copy_in("COPY items (id, name) FROM STDIN (FORMAT csv)")
        .await
        .unwrap();
    copy.send("3,c\n").await.unwrap();
    drop(copy);
    let n: i64 = conn
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    let mut binary = conn
        .copy_in_binary(
            "COPY items (id, name) FROM STDIN (FORMAT binary)",
            &[Type::INT8, Type::TEXT],
        )
        .await
        .unwrap();
    binary.write(&[&9_i64, &"i"]).await.unwrap();
    assert_eq!(binary.finish().await.unwrap(), 1);
    let out: Vec<bytes::Bytes> = conn
        .copy_out("COPY (SELECT id FROM items ORDER BY id) TO STDOUT")
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(out.concat(), b"1\n2\n9\n");
    drop(conn);
    pool_is_fine(&cluster).await;
    cluster.close(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_copy_in_flight_is_waited_for_by_close_and_none_starts_after() {
    let db = TestDb::new().await.unwrap();
    let cluster = with_table(&db).await;
    let mut copy = cluster
        .copy_in("load", "COPY items (id, name) FROM STDIN (FORMAT csv)")
        .await
        .unwrap();
    copy.send("1,a\n").await.unwrap();
    let closing = {
        let cluster = cluster.clone();
        tokio::spawn(async move { cluster.close(Duration::from_secs(10)).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!closing.is_finished(), "close waits for the copy");
    assert!(matches!(
        cluster.copy_in("load", "COPY items FROM STDIN").await,
        Err(Error::ShuttingDown { .. })
    ));
    assert!(matches!(
        cluster
            .copy_out("export", Route::Read, "COPY items TO STDOUT")
            .await,
        Err(Error::ShuttingDown { .. })
    ));
    copy.send("2,b\n").await.unwrap();
    assert_eq!(copy.finish().await.unwrap(), 2);
    let report = closing.await.unwrap();
    assert_eq!(report.cut_off, 0);
    let client = db.client().await.unwrap();
    let n: i64 = client
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
}

#[tokio::test]
async fn a_copy_cut_off_by_close_keeps_nothing() {
    let db = TestDb::new().await.unwrap();
    let cluster = with_table(&db).await;
    let mut copy = cluster
        .copy_in("load", "COPY items (id, name) FROM STDIN (FORMAT csv)")
        .await
        .unwrap();
    copy.send("1,a\n").await.unwrap();
    let report = cluster.close(Duration::from_millis(200)).await;
    assert_eq!(report.cut_off, 1);
    drop(copy);
    let client = db.client().await.unwrap();
    let n: i64 = client
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}

/// A million rows through `copy_in`, beside `psql \copy` of the same data on
/// the same server. Prints both rates; asserts only that every row arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_rows_beside_psql_copy() {
    const ROWS: usize = 1_000_000;
    let db = TestDb::new().await.unwrap();
    let cluster = with_table(&db).await;
    let mut data = String::with_capacity(ROWS * 24);
    for i in 0..ROWS {
        data.push_str(&format!("{i},name {i},{}\n", i % 1000));
    }
    let data = bytes::Bytes::from(data);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("items.csv");
    std::fs::write(&file, &data).unwrap();

    // pgstack: the data in 64 KiB pieces, as a reader would hand it over.
    let started = Instant::now();
    let mut copy = cluster
        .copy_in(
            "load",
            "COPY items (id, name, price) FROM STDIN (FORMAT csv)",
        )
        .await
        .unwrap();
    let mut offset = 0;
    while offset < data.len() {
        let end = (offset + 65_536).min(data.len());
        copy.send(data.slice(offset..end)).await.unwrap();
        offset = end;
    }
    assert_eq!(copy.finish().await.unwrap(), ROWS as u64);
    let ours = started.elapsed();
    assert_eq!(count(&cluster).await, ROWS as i64);

    // Binary, typed rows.
    cluster
        .execute("empty", Route::Write, "TRUNCATE items", &[])
        .await
        .unwrap();
    let started = Instant::now();
    let mut copy = cluster
        .copy_in_binary(
            "load-binary",
            "COPY items (id, name, price) FROM STDIN (FORMAT binary)",
            &[Type::INT8, Type::TEXT, Type::INT4],
        )
        .await
        .unwrap();
    for i in 0..ROWS as i64 {
        copy.write(&[&i, &format!("name {i}"), &((i % 1000) as i32)])
            .await
            .unwrap();
    }
    assert_eq!(copy.finish().await.unwrap(), ROWS as u64);
    let binary = started.elapsed();

    // psql \copy of the same file into the same table.
    cluster
        .execute("empty", Route::Write, "TRUNCATE items", &[])
        .await
        .unwrap();
    let url = db.url().to_owned();
    let command = format!(
        "\\copy items (id, name, price) FROM '{}' (FORMAT csv)",
        file.display()
    );
    let started = Instant::now();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("psql")
            .arg(&url)
            .arg("-v")
            .arg("ON_ERROR_STOP=1")
            .arg("-c")
            .arg(&command)
            .output()
    })
    .await
    .unwrap()
    .expect("psql runs");
    let theirs = started.elapsed();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(count(&cluster).await, ROWS as i64);

    let rate = |d: Duration| ROWS as f64 / d.as_secs_f64();
    eprintln!(
        "COPY of {ROWS} rows: pgstack copy_in (csv) {:.0} rows/s ({ours:.2?}), \
         pgstack copy_in_binary {:.0} rows/s ({binary:.2?}), psql \\copy {:.0} rows/s ({theirs:.2?})",
        rate(ours),
        rate(binary),
        rate(theirs)
    );
    cluster.close(Duration::from_secs(5)).await;
}
