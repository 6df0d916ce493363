//! Case 2: `SELECT 1` with a prepared statement, and a small indexed lookup
//! on the reference schema; 1 / 16 / 64 concurrent tasks; throughput and
//! p50/p99 latency. pgstack goes through the whole facade.

use std::time::Duration;

use crate::Ctx;
use crate::libs::{self, *};
use crate::load::{self, Sample};
use crate::report::{Better, Entry, Medians};

const POOL: u32 = 16;
const TASKS: &[usize] = &[1, 16, 64, 256];
/// One connection per task: raw tokio-postgres and pgbench stop here (the
/// server's `max_connections` is 300, and the pools hold theirs).
const ONE_CONNECTION_PER_TASK_MAX: usize = 64;

pub(crate) enum Lib {
    Pgstack(pgstack::Database),
    Raw(String),
    /// tokio-postgres's own pipelining (`--phases` only).
    RawShared(String),
    Bb8(Bb8Pool),
    Deadpool(deadpool_postgres::Pool),
    Sqlx(sqlx::PgPool),
}

impl Lib {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Lib::Pgstack(_) => PGSTACK,
            Lib::Raw(_) => RAW,
            Lib::RawShared(_) => RAW_SHARED,
            Lib::Bb8(_) => BB8,
            Lib::Deadpool(_) => DEADPOOL,
            Lib::Sqlx(_) => SQLX,
        }
    }

    pub(crate) async fn measure(
        &self,
        q: Query,
        tasks: usize,
        window: Duration,
    ) -> anyhow::Result<Sample> {
        let seeds = 0..tasks as u64;
        match self {
            Lib::Pgstack(db) => {
                let w = seeds
                    .map(|s| PgstackStatement {
                        db: db.clone(),
                        q,
                        ids: Ids::new(s),
                    })
                    .collect();
                let busy = || db.metrics().cluster.lanes_busy;
                let before = busy();
                let mut sample = load::measure(w, window, true).await?;
                if crate::phases::enabled() {
                    sample.lanes_busy = Some(busy().saturating_sub(before));
                }
                Ok(sample)
            }
            Lib::Raw(url) => {
                let mut w = Vec::with_capacity(tasks);
                for s in seeds {
                    w.push(RawStatement::connect(url, q, s).await?);
                }
                load::measure(w, window, true).await
            }
            Lib::RawShared(url) => {
                let w = RawStatement::shared(url, q, tasks).await?;
                load::measure(w, window, true).await
            }
            Lib::Bb8(pool) => {
                let w = seeds
                    .map(|s| Bb8Statement {
                        pool: pool.clone(),
                        q,
                        ids: Ids::new(s),
                    })
                    .collect();
                load::measure(w, window, true).await
            }
            Lib::Deadpool(pool) => {
                let w = seeds
                    .map(|s| DeadpoolStatement {
                        pool: pool.clone(),
                        q,
                        ids: Ids::new(s),
                    })
                    .collect();
                load::measure(w, window, true).await
            }
            Lib::Sqlx(pool) => {
                let w = seeds
                    .map(|s| SqlxStatement {
                        pool: pool.clone(),
                        q,
                        ids: Ids::new(s),
                    })
                    .collect();
                load::measure(w, window, true).await
            }
        }
    }
}

pub(crate) async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Entry>> {
    crate::say("case 2: statements");
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
    let queries = [Query::Select1, Query::Lookup { rows: ctx.rows }];
    crate::pgbench::setup(ctx).await?;
    // Warm every pool and statement cache.
    for q in queries {
        for lib in &libs {
            lib.measure(q, 64, ctx.warmup).await?;
        }
    }
    let mut entries = Vec::new();
    for q in queries {
        for &tasks in TASKS {
            let mut medians: Vec<Medians> = libs.iter().map(|_| Medians::default()).collect();
            let mut first_errors: Vec<Option<String>> = libs.iter().map(|_| None).collect();
            let mut floor = Medians::default();
            for _ in 0..ctx.repeats {
                for (i, lib) in libs.iter().enumerate() {
                    if tasks > ONE_CONNECTION_PER_TASK_MAX && matches!(lib, Lib::Raw(_)) {
                        continue;
                    }
                    let sample = lib.measure(q, tasks, ctx.window).await?;
                    medians[i].push("ops_per_s", 0, sample.ops_per_s());
                    medians[i].push("p50_us", 1, sample.quantile_us(0.50));
                    medians[i].push("p99_us", 1, sample.quantile_us(0.99));
                    medians[i].push("errors", 0, sample.errors as f64);
                    crate::phases::push(&mut medians[i], &sample);
                    if first_errors[i].is_none() {
                        first_errors[i] = sample.first_error;
                    }
                }
                if tasks <= ONE_CONNECTION_PER_TASK_MAX {
                    let run = crate::pgbench::run(ctx, q, tasks, ctx.window).await?;
                    floor.push("ops_per_s", 0, run.tps);
                    floor.push("latency_avg_us", 1, run.latency_avg_us);
                }
            }
            let mut entry = Entry::new("2. statements")
                .param("query", q.name())
                .param("sql", q.sql())
                .param("tasks", tasks as u64)
                .param("pool_size", POOL)
                .column("ops_per_s", "statements/s")
                .column("p50_us", "p50 µs")
                .column("p99_us", "p99 µs")
                .column("latency_avg_us", "mean µs")
                .column("errors", "errors")
                .headline("ops_per_s", Better::Higher);
            if tasks <= ONE_CONNECTION_PER_TASK_MAX {
                entry.result("pgbench (floor)", floor.into_map());
            }
            for ((lib, m), first_error) in libs.iter().zip(medians).zip(first_errors) {
                let mut m = m;
                if let Some(e) = first_error {
                    m.set("first_error", e);
                }
                entry.result(lib.name(), m.into_map());
            }
            crate::say(format!("  {} with {tasks} tasks measured", q.name()));
            entries.push(entry);
        }
    }
    if let Some(e) = entries.last_mut() {
        e.note(
            "pgstack: `Database::query_one(op, Route::Read, sql, params)` — routing, breaker, \
             retries, the metrics recorder and a tracing subscriber all on; statements share \
             pipelined connections. tokio-postgres: one client per task, prepared once. \
             bb8-postgres: `get()` then `query_one(sql)` (tokio-postgres prepares a text \
             statement on every call; bb8 pings on every checkout). deadpool-postgres: `get()` \
             then `prepare_cached`. sqlx: `query(sql).fetch_one(&pool)` (statement cache on, \
             ping on every acquire). Pools hold 16 connections. pgbench (floor): `-M prepared \
             -j 2`, one connection per client, `SELECT 1` from a script file, and `-S` (its own \
             lookup by key, scale 1) beside \"bill by id\"; it and tokio-postgres stop at 64 \
             tasks (one connection each).",
        );
    }
    let _ = db.shutdown(Duration::from_secs(2)).await;
    Ok(entries)
}
