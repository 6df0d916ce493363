//! Case 7: mixed load. 64 tasks run `SELECT 1` while 2 tasks run a 50 ms
//! query (`SELECT pg_sleep(0.05)`) in a loop; the fast statements'
//! throughput and p50/p99 latency. A library that queues fast statements
//! behind slow ones (a shared connection, or a pool the slow ones hold)
//! shows it in the fast statements' p99.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use pgstack::Route;

use crate::Ctx;
use crate::libs::{self, *};
use crate::report::{Better, Entry, Medians};
use crate::statements::Lib;

const POOL: u32 = 16;
const FAST_TASKS: usize = 64;
const SLOW_TASKS: usize = 2;
const SLOW: &str = "SELECT pg_sleep(0.05)";

/// Runs the slow statement in a loop until `stop`, through `lib`.
async fn slow_loop(lib: &Lib, stop: &AtomicBool) -> anyhow::Result<u64> {
    let mut n = 0;
    match lib {
        Lib::Pgstack(db) => {
            while !stop.load(Ordering::Relaxed) {
                db.query("slow", Route::Read, SLOW, &[]).await?;
                n += 1;
            }
        }
        Lib::Raw(url) | Lib::RawShared(url) => {
            let client = libs::raw(url).await?;
            while !stop.load(Ordering::Relaxed) {
                client.query(SLOW, &[]).await?;
                n += 1;
            }
        }
        Lib::Bb8(pool) => {
            while !stop.load(Ordering::Relaxed) {
                pool.get().await?.query(SLOW, &[]).await?;
                n += 1;
            }
        }
        Lib::Deadpool(pool) => {
            while !stop.load(Ordering::Relaxed) {
                let client = pool.get().await?;
                let statement = client.prepare_cached(SLOW).await?;
                client.query(&statement, &[]).await?;
                n += 1;
            }
        }
        Lib::Sqlx(pool) => {
            while !stop.load(Ordering::Relaxed) {
                sqlx::query(SLOW).execute(pool).await?;
                n += 1;
            }
        }
    }
    Ok(n)
}

pub(crate) async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Entry>> {
    crate::say("case 7: mixed load");
    let db = libs::pgstack(libs::pgstack_config(&ctx.url, POOL)?).await?;
    let mut libs = vec![
        Lib::Pgstack(db.clone()),
        Lib::Raw(ctx.url.clone()),
        Lib::Bb8(libs::bb8(&ctx.url, POOL).await?),
        Lib::Deadpool(libs::deadpool(&ctx.url, POOL as usize)?),
        Lib::Sqlx(libs::sqlx(&ctx.url, POOL).await?),
    ];
    if crate::phases::enabled() {
        libs.push(Lib::RawShared(ctx.url.clone()));
    }
    let libs = Arc::new(libs);
    // Warm every pool and statement cache, the slow statement's included.
    for lib in libs.iter() {
        lib.measure(Query::Select1, FAST_TASKS, ctx.warmup).await?;
        let stop = AtomicBool::new(true);
        slow_loop(lib, &stop).await?;
    }
    let mut medians: Vec<Medians> = libs.iter().map(|_| Medians::default()).collect();
    let mut first_errors: Vec<Option<String>> = libs.iter().map(|_| None).collect();
    for _ in 0..ctx.repeats {
        for (i, lib) in libs.iter().enumerate() {
            let stop = Arc::new(AtomicBool::new(false));
            let slow: Vec<_> = (0..SLOW_TASKS)
                .map(|_| {
                    let (libs, stop) = (Arc::clone(&libs), Arc::clone(&stop));
                    tokio::spawn(async move { slow_loop(&libs[i], &stop).await })
                })
                .collect();
            // The slow statements are running before the window opens.
            tokio::time::sleep(Duration::from_millis(60)).await;
            let sample = lib.measure(Query::Select1, FAST_TASKS, ctx.window).await;
            stop.store(true, Ordering::Relaxed);
            let mut slow_done = 0;
            for task in slow {
                slow_done += task.await??;
            }
            let sample = sample?;
            medians[i].push("ops_per_s", 0, sample.ops_per_s());
            medians[i].push("p50_us", 1, sample.quantile_us(0.50));
            medians[i].push("p99_us", 1, sample.quantile_us(0.99));
            medians[i].push("slow_per_s", 1, slow_done as f64 / sample.seconds);
            medians[i].push("errors", 0, sample.errors as f64);
            crate::phases::push(&mut medians[i], &sample);
            if first_errors[i].is_none() {
                first_errors[i] = sample.first_error;
            }
        }
    }
    let mut entry = Entry::new("7. mixed load")
        .param("fast", "SELECT 1")
        .param("fast_tasks", FAST_TASKS as u64)
        .param("slow", SLOW)
        .param("slow_tasks", SLOW_TASKS as u64)
        .param("pool_size", POOL)
        .column("ops_per_s", "fast statements/s")
        .column("p50_us", "fast p50 µs")
        .column("p99_us", "fast p99 µs")
        .column("slow_per_s", "slow statements/s")
        .column("errors", "errors")
        .headline("p99_us", Better::Lower);
    for ((lib, m), first_error) in libs.iter().zip(medians).zip(first_errors) {
        let mut m = m;
        if let Some(e) = first_error {
            m.set("first_error", e);
        }
        entry.result(lib.name(), m.into_map());
    }
    entry.note(
        "The slow statements run in 2 tasks of their own through the same library (pool, \
         database handle) as the 64 fast ones. tokio-postgres: one client per task, so nothing \
         is shared. The pools hold 16 connections; pgstack's statements share pipelined \
         connections, and a statement known to be long takes one of its own.",
    );
    crate::say("  64 fast and 2 slow tasks measured");
    let _ = db.shutdown(Duration::from_secs(2)).await;
    Ok(vec![entry])
}
