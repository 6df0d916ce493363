//! Case 1: checkout and return of a connection, no query; pool size 16,
//! 1 / 16 / 64 / 256 tasks; operations per second.

use crate::Ctx;
use crate::libs::{self, *};
use crate::load::{self, Worker};
use crate::report::{Better, Entry, Medians};

const POOL: u32 = 16;
const TASKS: &[usize] = &[1, 16, 64, 256];

enum Lib {
    Pgstack(pgstack::Database),
    Pool(pgstack::pool::Pool),
    Bb8(Bb8Pool),
    Deadpool(deadpool_postgres::Pool),
    Sqlx(sqlx::PgPool),
}

impl Lib {
    fn name(&self) -> &'static str {
        match self {
            Lib::Pgstack(_) => PGSTACK,
            Lib::Pool(_) => PGSTACK_POOL,
            Lib::Bb8(_) => BB8,
            Lib::Deadpool(_) => DEADPOOL,
            Lib::Sqlx(_) => SQLX,
        }
    }

    async fn measure(
        &self,
        tasks: usize,
        window: std::time::Duration,
    ) -> anyhow::Result<load::Sample> {
        fn n<W: Worker>(tasks: usize, f: impl Fn() -> W) -> Vec<W> {
            (0..tasks).map(|_| f()).collect()
        }
        match self {
            Lib::Pgstack(db) => {
                load::measure(n(tasks, || PgstackCheckout(db.clone())), window, false).await
            }
            Lib::Pool(p) => {
                load::measure(n(tasks, || PoolCheckout(p.clone())), window, false).await
            }
            Lib::Bb8(p) => load::measure(n(tasks, || Bb8Checkout(p.clone())), window, false).await,
            Lib::Deadpool(p) => {
                load::measure(n(tasks, || DeadpoolCheckout(p.clone())), window, false).await
            }
            Lib::Sqlx(p) => {
                load::measure(n(tasks, || SqlxCheckout(p.clone())), window, false).await
            }
        }
    }
}

pub(crate) async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Entry>> {
    crate::say("case 1: checkout and return");
    let db = libs::pgstack(libs::pgstack_config(&ctx.url, POOL)?).await?;
    let libs = vec![
        Lib::Pgstack(db.clone()),
        Lib::Pool(libs::pgstack_pool(&ctx.url, POOL).await?),
        Lib::Bb8(libs::bb8(&ctx.url, POOL).await?),
        Lib::Deadpool(libs::deadpool(&ctx.url, POOL as usize)?),
        Lib::Sqlx(libs::sqlx(&ctx.url, POOL).await?),
    ];
    // Every pool opens its 16 connections before anything is timed.
    for lib in &libs {
        lib.measure(64, ctx.warmup).await?;
    }
    let mut entries = Vec::new();
    for &tasks in TASKS {
        let mut medians: Vec<Medians> = libs.iter().map(|_| Medians::default()).collect();
        let mut first_errors: Vec<Option<String>> = libs.iter().map(|_| None).collect();
        for _ in 0..ctx.repeats {
            for (i, lib) in libs.iter().enumerate() {
                let sample = lib.measure(tasks, ctx.window).await?;
                medians[i].push("ops_per_s", 0, sample.ops_per_s());
                medians[i].push("errors", 0, sample.errors as f64);
                if first_errors[i].is_none() {
                    first_errors[i] = sample.first_error;
                }
            }
        }
        let mut entry = Entry::new("1. checkout and return, no query")
            .param("pool_size", POOL)
            .param("tasks", tasks as u64)
            .column("ops_per_s", "checkouts/s")
            .column("errors", "errors")
            .column("validation", "checkout check")
            .headline("ops_per_s", Better::Higher);
        for ((lib, mut m), first_error) in libs.iter().zip(medians).zip(first_errors) {
            m.set("validation", validation(lib));
            if let Some(e) = first_error {
                m.set("first_error", e);
            }
            entry.result(lib.name(), m.into_map());
        }
        crate::say(format!("  {tasks} tasks measured"));
        entries.push(entry);
    }
    if let Some(e) = entries.last_mut() {
        e.note(
            "pgstack is `Database::connection(op, Route::Write)` through the facade; \
             pgstack-pool is `Pool::get(op)` alone. Raw tokio-postgres has no checkout and is \
             left out.",
        );
    }
    let _ = db.shutdown(std::time::Duration::from_secs(2)).await;
    Ok(entries)
}

fn validation(lib: &Lib) -> &'static str {
    match lib {
        Lib::Pgstack(_) | Lib::Pool(_) => {
            "local: socket, session state, lifetime, generation; ping after 30 s idle"
        }
        Lib::Bb8(_) => "ping (`simple_query(\"\")`) every checkout",
        Lib::Deadpool(_) => "`is_closed()` only (RecyclingMethod::Fast)",
        Lib::Sqlx(_) => "ping every acquire (test_before_acquire)",
    }
}
