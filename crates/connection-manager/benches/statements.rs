//! `SELECT 1` from 64 tasks through a cluster: statements on shared,
//! pipelined connections against a connection checked out per statement.
//!
//! Needs the PostgreSQL server binaries (the test kit starts a throwaway
//! server): `cargo bench -p pgstack-connection`.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use pgstack_config::DatabaseConfig;
use pgstack_connection::{Cluster, Route};

const TASKS: u64 = 64;
const PER_TASK: u64 = 20;

async fn burst(cluster: &Cluster) {
    let mut tasks = Vec::with_capacity(TASKS as usize);
    for _ in 0..TASKS {
        let cluster = cluster.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..PER_TASK {
                cluster
                    .query("select-1", Route::Write, "SELECT 1", &[])
                    .await
                    .unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

fn statements(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = runtime
        .block_on(pgstack_tests::TestCluster::start())
        .unwrap();
    let mut config = DatabaseConfig::for_tests(&server.url("postgres")).unwrap();
    config.pool.max_size = 16;
    config.pool.min_idle = 16;

    let mut group = c.benchmark_group("select-1, 64 tasks");
    group.throughput(Throughput::Elements(TASKS * PER_TASK));
    group.measurement_time(Duration::from_secs(5));
    for (name, shared) in [("checkout per statement", 0), ("2 shared connections", 2)] {
        let cluster = runtime
            .block_on(Cluster::builder(&config).shared_connections(shared).build())
            .unwrap();
        group.bench_function(name, |b| {
            b.iter_custom(|iterations| {
                runtime.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iterations {
                        burst(&cluster).await;
                    }
                    start.elapsed()
                })
            });
        });
    }
    group.finish();
}

criterion_group!(benches, statements);
criterion_main!(benches);
