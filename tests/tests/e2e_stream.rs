#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stderr)]
//! A stream of 100,000 rows of about 2 kB each (some 200 MB) through
//! `pgstack::Database`, read with bounded memory: the process's peak
//! resident memory grows by a small fraction of the result. Alone in its
//! test binary, so no other test's allocations blur the figure.

mod common;

use futures_util::TryStreamExt;
use pgstack::prelude::*;
use pgstack_tests::TestDb;

/// `VmRSS` or `VmHWM` (peak) of this process, in kB (Linux).
fn memory_kb(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test]
async fn a_stream_of_100k_rows_is_read_with_bounded_memory() {
    let tdb = TestDb::new().await.unwrap();
    let db = common::connect(common::config(tdb.url())).await;
    let baseline = memory_kb("VmRSS:");
    let on = db.on("big-stream", Route::Read);
    let mut rows = on
        .query_stream(
            "SELECT g, repeat(md5(g::text), 64) AS payload FROM generate_series(1, 100000) g",
            &[],
        )
        .await
        .unwrap();
    let (mut n, mut bytes) = (0_u64, 0_u64);
    while let Some(row) = rows.try_next().await.unwrap() {
        n += 1;
        bytes += row.get::<_, &str>(1).len() as u64;
        assert_eq!(row.get::<_, i32>(0) as u64, n);
    }
    drop(rows);
    let peak = memory_kb("VmHWM:");
    let grown_mb = peak.saturating_sub(baseline) / 1024;
    eprintln!(
        "streamed {n} rows, {} MB of payload; peak resident memory grew by {grown_mb} MB",
        bytes / 1_048_576
    );
    assert_eq!(n, 100_000);
    assert_eq!(bytes, 100_000 * 2048);
    assert!(
        grown_mb < 48,
        "memory grew by {grown_mb} MB for a 195 MB result"
    );
}
