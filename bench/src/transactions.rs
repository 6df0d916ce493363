//! Case 8: transactions. 16 and 64 tasks each run a read-write transaction
//! of three statements (read a bill, update it, read it back) on random
//! bills: pgstack's `Database::transaction`, deadpool-postgres'
//! `Client::transaction`, sqlx's `Pool::begin`. Throughput and p50/p99.

use pgstack::Queryable as _;
use std::time::Duration;

use crate::Ctx;
use crate::libs::{self, Ids};
use crate::load::{self, Worker};
use crate::report::{Better, Entry, Medians};

const POOL: u32 = 16;
const TASKS: &[usize] = &[16, 64];

const READ: &str = "SELECT title FROM bills WHERE id = $1";
const UPDATE: &str = "UPDATE bills SET title = $2 WHERE id = $1";
const READ_BACK: &str = "SELECT title FROM bills WHERE id = $1";

enum Lib {
    Pgstack(pgstack::Database),
    Deadpool(deadpool_postgres::Pool),
    Sqlx(sqlx::PgPool),
}

impl Lib {
    fn name(&self) -> &'static str {
        match self {
            Lib::Pgstack(_) => libs::PGSTACK,
            Lib::Deadpool(_) => libs::DEADPOOL,
            Lib::Sqlx(_) => libs::SQLX,
        }
    }

    async fn measure(
        &self,
        rows: i64,
        tasks: usize,
        window: Duration,
    ) -> anyhow::Result<load::Sample> {
        let seeds = 0..tasks as u64;
        match self {
            Lib::Pgstack(db) => {
                let w = seeds
                    .map(|s| PgstackTx {
                        db: db.clone(),
                        ids: Ids::new(s + 1000),
                        rows,
                    })
                    .collect();
                load::measure(w, window, true).await
            }
            Lib::Deadpool(pool) => {
                let w = seeds
                    .map(|s| DeadpoolTx {
                        pool: pool.clone(),
                        ids: Ids::new(s + 1000),
                        rows,
                    })
                    .collect();
                load::measure(w, window, true).await
            }
            Lib::Sqlx(pool) => {
                let w = seeds
                    .map(|s| SqlxTx {
                        pool: pool.clone(),
                        ids: Ids::new(s + 1000),
                        rows,
                    })
                    .collect();
                load::measure(w, window, true).await
            }
        }
    }
}

struct PgstackTx {
    db: pgstack::Database,
    ids: Ids,
    rows: i64,
}

impl Worker for PgstackTx {
    async fn call(&mut self) -> anyhow::Result<()> {
        let id = self.ids.next(self.rows);
        let title: String = self
            .db
            .transaction("bench-tx", async move |tx| {
                let row = tx.query_one(READ, &[&id]).await?;
                let title: String = row.get(0);
                tx.execute(UPDATE, &[&id, &title]).await?;
                let row = tx.query_one(READ_BACK, &[&id]).await?;
                Ok::<_, pgstack::Error>(row.get(0))
            })
            .await?;
        anyhow::ensure!(!title.is_empty(), "no title");
        Ok(())
    }
}

struct DeadpoolTx {
    pool: deadpool_postgres::Pool,
    ids: Ids,
    rows: i64,
}

impl Worker for DeadpoolTx {
    async fn call(&mut self) -> anyhow::Result<()> {
        let id = self.ids.next(self.rows);
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let read = tx.prepare_cached(READ).await?;
        let update = tx.prepare_cached(UPDATE).await?;
        let row = tx.query_one(&read, &[&id]).await?;
        let title: String = row.get(0);
        tx.execute(&update, &[&id, &title]).await?;
        let row = tx.query_one(&read, &[&id]).await?;
        let title: String = row.get(0);
        tx.commit().await?;
        anyhow::ensure!(!title.is_empty(), "no title");
        Ok(())
    }
}

struct SqlxTx {
    pool: sqlx::PgPool,
    ids: Ids,
    rows: i64,
}

impl Worker for SqlxTx {
    async fn call(&mut self) -> anyhow::Result<()> {
        use sqlx::Row as _;
        let id = self.ids.next(self.rows);
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(READ).bind(id).fetch_one(&mut *tx).await?;
        let title: String = row.try_get(0)?;
        sqlx::query(UPDATE)
            .bind(id)
            .bind(&title)
            .execute(&mut *tx)
            .await?;
        let row = sqlx::query(READ_BACK).bind(id).fetch_one(&mut *tx).await?;
        let title: String = row.try_get(0)?;
        tx.commit().await?;
        anyhow::ensure!(!title.is_empty(), "no title");
        Ok(())
    }
}

pub(crate) async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Entry>> {
    crate::say("case 8: transactions");
    let db = libs::pgstack(libs::pgstack_config(&ctx.url, POOL)?).await?;
    let libs = vec![
        Lib::Pgstack(db.clone()),
        Lib::Deadpool(libs::deadpool(&ctx.url, POOL as usize)?),
        Lib::Sqlx(libs::sqlx(&ctx.url, POOL).await?),
    ];
    for lib in &libs {
        lib.measure(ctx.rows, 16, ctx.warmup).await?;
    }
    let mut entries = Vec::new();
    for &tasks in TASKS {
        let mut medians: Vec<Medians> = libs.iter().map(|_| Medians::default()).collect();
        let mut first_errors: Vec<Option<String>> = libs.iter().map(|_| None).collect();
        for _ in 0..ctx.repeats {
            for (i, lib) in libs.iter().enumerate() {
                let sample = lib.measure(ctx.rows, tasks, ctx.window).await?;
                medians[i].push("ops_per_s", 0, sample.ops_per_s());
                medians[i].push("p50_us", 1, sample.quantile_us(0.50));
                medians[i].push("p99_us", 1, sample.quantile_us(0.99));
                medians[i].push("errors", 0, sample.errors as f64);
                crate::phases::push(&mut medians[i], &sample);
                if first_errors[i].is_none() {
                    first_errors[i] = sample.first_error;
                }
            }
        }
        let mut entry = Entry::new("8. transactions")
            .param("statements", "read, update, read back")
            .param("tasks", tasks as u64)
            .param("pool_size", POOL)
            .column("ops_per_s", "transactions/s")
            .column("p50_us", "p50 µs")
            .column("p99_us", "p99 µs")
            .column("errors", "errors")
            .headline("ops_per_s", Better::Higher);
        for ((lib, m), first_error) in libs.iter().zip(medians).zip(first_errors) {
            let mut m = m;
            if let Some(e) = first_error {
                m.set("first_error", e);
            }
            entry.result(lib.name(), m.into_map());
        }
        crate::say(format!("  transactions with {tasks} tasks measured"));
        entries.push(entry);
    }
    if let Some(e) = entries.last_mut() {
        e.note(
            "Each transaction reads a random bill, updates its title and reads it back, then \
             commits. pgstack: `Database::transaction` (the closure's statements prepared and \
             cached; the transaction's id read with its first write, so an interrupted COMMIT can be looked \
             up). deadpool-postgres: \
             `get()`, `transaction()`, `prepare_cached`, `commit()`. sqlx: `begin()`, three \
             `query(..)` on the transaction, `commit()`. Pools hold 16 connections.",
        );
    }
    let _ = db.shutdown(Duration::from_secs(2)).await;
    Ok(entries)
}
