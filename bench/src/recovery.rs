//! Case 5: the server killed (SIGKILL) and restarted under 64 tasks reading
//! bills. For each library: the time from the server accepting connections
//! again to the first successful query, until every task has had one, and
//! the errors callers saw.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::libs::{self, *};
use crate::load::{self, Mark, Options, TaskOutcome, Worker};
use crate::report::{Better, Entry, Medians};
use crate::{Ctx, DB};

const POOL: u32 = 16;
const TASKS: usize = 64;
/// Each call's deadline: longer than the outage.
const DEADLINE: Duration = Duration::from_secs(10);
/// Between the kill and the restart.
const DOWN_FOR: Duration = Duration::from_secs(1);
/// Longest wait, after the server accepts connections, for every task to succeed.
const HORIZON: Duration = Duration::from_secs(12);

enum Lib {
    Pgstack(pgstack::Database),
    Raw(String),
    Bb8(Bb8Pool),
    Deadpool(deadpool_postgres::Pool),
    Sqlx(sqlx::PgPool),
}

/// What one kill-and-restart showed.
struct Outage {
    outage_s: f64,
    first_success_ms: Option<f64>,
    all_recovered_ms: Option<f64>,
    errors: u64,
    callers_with_errors: usize,
    first_error: Option<String>,
}

pub(crate) async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Entry>> {
    crate::say("case 5: recovery after kill -9 and restart");
    let rows = ctx.rows;
    let q = Query::Lookup { rows };
    let mut entry = Entry::new("5. recovery: server killed and restarted under 64 tasks")
        .param("tasks", TASKS as u64)
        .param("pool_size", POOL)
        .param("query", q.name())
        .param("caller_deadline_s", DEADLINE.as_secs())
        .param("down_for_ms", DOWN_FOR.as_millis() as u64)
        .column("first_success_ms", "first success, ms")
        .column("all_recovered_ms", "all 64 tasks, ms")
        .column("errors", "failed calls")
        .column("callers_with_errors", "tasks that saw an error")
        .column("outage_s", "outage s")
        .headline("first_success_ms", Better::Lower);
    for name in [PGSTACK, RAW, BB8, DEADPOOL, SQLX] {
        let lib = match name {
            PGSTACK => Lib::Pgstack(libs::pgstack(libs::pgstack_config(&ctx.url, POOL)?).await?),
            RAW => Lib::Raw(ctx.url.clone()),
            BB8 => Lib::Bb8(libs::bb8(&ctx.url, POOL).await?),
            DEADPOOL => Lib::Deadpool(libs::deadpool(&ctx.url, POOL as usize)?),
            _ => Lib::Sqlx(libs::sqlx(&ctx.url, POOL).await?),
        };
        let mut m = Medians::default();
        let mut first_error = None;
        let mut never = 0;
        let mut total_errors = 0;
        for _ in 0..ctx.repeats {
            let outage = match &lib {
                Lib::Pgstack(db) => {
                    one(
                        ctx,
                        (0..TASKS as u64).map(|s| PgstackStatement {
                            db: db.clone(),
                            q,
                            ids: Ids::new(s),
                        }),
                    )
                    .await?
                }
                Lib::Raw(url) => {
                    one(
                        ctx,
                        (0..TASKS as u64).map(|s| RawReconnecting {
                            url: url.clone(),
                            current: None,
                            q,
                            seed: s * 1000,
                        }),
                    )
                    .await?
                }
                Lib::Bb8(pool) => {
                    one(
                        ctx,
                        (0..TASKS as u64).map(|s| Bb8Statement {
                            pool: pool.clone(),
                            q,
                            ids: Ids::new(s),
                        }),
                    )
                    .await?
                }
                Lib::Deadpool(pool) => {
                    one(
                        ctx,
                        (0..TASKS as u64).map(|s| DeadpoolStatement {
                            pool: pool.clone(),
                            q,
                            ids: Ids::new(s),
                        }),
                    )
                    .await?
                }
                Lib::Sqlx(pool) => {
                    one(
                        ctx,
                        (0..TASKS as u64).map(|s| SqlxStatement {
                            pool: pool.clone(),
                            q,
                            ids: Ids::new(s),
                        }),
                    )
                    .await?
                }
            };
            m.push("outage_s", 2, outage.outage_s);
            m.push(
                "first_success_ms",
                1,
                outage.first_success_ms.unwrap_or(f64::NAN),
            );
            match outage.all_recovered_ms {
                Some(ms) => m.push("all_recovered_ms", 1, ms),
                None => never += 1,
            }
            m.push("errors", 0, outage.errors as f64);
            m.push("callers_with_errors", 0, outage.callers_with_errors as f64);
            total_errors += outage.errors;
            if first_error.is_none() {
                first_error = outage.first_error;
            }
        }
        if never > 0 {
            m.set(
                "not_recovered_runs",
                format!(
                    "{never} of {} runs: not every task succeeded within {} s",
                    ctx.repeats,
                    HORIZON.as_secs()
                ),
            );
        }
        m.set("errors_total", total_errors);
        if let Some(e) = first_error {
            m.set("first_error", e);
        }
        entry.result(name, m.into_map());
        if let Lib::Pgstack(db) = &lib {
            let _ = db.shutdown(Duration::from_secs(2)).await;
        }
        crate::say(format!("  {name} measured"));
    }
    entry.note(format!(
        "Each run: 64 tasks read bills in a loop (each call under a {} s deadline, 10 ms pause \
         after a failed call), the server is killed with SIGKILL, restarted {} ms later (crash \
         recovery), and a probe connecting every 2 ms (on a thread of its own) marks when it accepts connections \
         again — or the first call of the library under test to succeed after the restart began, \
         if that came earlier. First success: the time from that mark to the first successful \
         call (0 when the library's own call set the mark). Failed calls count every error callers saw \
         from the kill on. Raw tokio-postgres reconnects its client after an error. \
         Every library runs with its defaults; pgstack's calls wait for the unavailable node \
         until their retry deadline (`retry.deadline`, 30 s), and its background probe \
         half-opens the breaker as soon as the server accepts logins again.",
        DEADLINE.as_secs(),
        DOWN_FOR.as_millis()
    ));
    Ok(vec![entry])
}

/// One kill and restart under `workers`.
async fn one<W: Worker>(ctx: &Ctx, workers: impl Iterator<Item = W>) -> anyhow::Result<Outage> {
    let mark = Arc::new(Mark::new());
    let running = load::start(
        workers.collect(),
        Options {
            events: true,
            deadline: Some(DEADLINE),
            pause_after_error: Duration::from_millis(10),
            mark: Some(Arc::clone(&mark)),
            ..Options::default()
        },
    );
    running.begin().await;
    tokio::time::sleep(if ctx.quick {
        Duration::from_millis(300)
    } else {
        Duration::from_millis(700)
    })
    .await;
    let killed_at = Instant::now();
    ctx.cluster.kill9().await?;
    let dead_at = Instant::now();
    tokio::time::sleep(DOWN_FOR).await;
    // Backends of the killed server may answer until they notice the
    // postmaster is gone; only a call ending after the restart began has
    // been served by the new server.
    let restart_at = Instant::now();
    let url = ctx.cluster.url(DB);
    // The probe runs on a thread and runtime of its own, so the tasks under
    // test do not delay it.
    let probe = std::thread::spawn(move || -> anyhow::Result<Instant> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(accepted(&url))
    });
    ctx.cluster.start_again().await?;
    let restarted_at = Instant::now();
    let accepted_at = tokio::task::spawn_blocking(move || {
        probe
            .join()
            .map_err(|_| anyhow::anyhow!("the acceptance probe panicked"))?
    })
    .await??;
    mark.set(accepted_at);
    let limit = Instant::now() + HORIZON;
    while mark.reached.load(std::sync::atomic::Ordering::Acquire) < TASKS && Instant::now() < limit
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let outcomes = running.finish().await?;
    let outage = summarize(&outcomes, killed_at, restart_at, accepted_at);
    if std::env::var_os("PGSTACK_BENCH_DEBUG").is_some() {
        crate::say(format!(
            "    kill took {:?}, dead→accepted {:?}, dead→start_again returned {:?}, first success {:?} ms from accepted",
            dead_at - killed_at,
            accepted_at - dead_at,
            restarted_at - dead_at,
            outage.first_success_ms
        ));
    }
    Ok(outage)
}

/// When a new connection first logs in and answers.
async fn accepted(url: &str) -> anyhow::Result<Instant> {
    let give_up = Instant::now() + Duration::from_secs(60);
    loop {
        // A short limit: an attempt caught in the restart is dropped and retried.
        let attempt = tokio::time::timeout(Duration::from_millis(100), async {
            let client = libs::raw(url).await?;
            client.simple_query("").await?;
            anyhow::Ok(())
        })
        .await;
        match attempt {
            Ok(Ok(())) => return Ok(Instant::now()),
            Ok(Err(e)) if std::env::var_os("PGSTACK_BENCH_DEBUG").is_some() => {
                crate::say(format!("      probe: {e:#}"));
            }
            Err(_) if std::env::var_os("PGSTACK_BENCH_DEBUG").is_some() => {
                crate::say("      probe: timed out");
            }
            _ => {}
        }
        if Instant::now() > give_up {
            anyhow::bail!("the server did not accept connections within 60 s of its restart");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn ms(d: f64) -> f64 {
    d * 1000.0
}

fn signed_s(a: Instant, b: Instant) -> f64 {
    if a >= b {
        (a - b).as_secs_f64()
    } else {
        -(b - a).as_secs_f64()
    }
}

fn summarize(
    outcomes: &[TaskOutcome],
    killed_at: Instant,
    restart_at: Instant,
    accepted_at: Instant,
) -> Outage {
    // The server accepts connections at the latest when the probe, or any
    // call, first gets an answer from it.
    let accepted_at = outcomes
        .iter()
        .flat_map(|o| o.events.iter())
        .filter(|(end, ok)| *ok && *end > restart_at)
        .map(|(end, _)| *end)
        .fold(accepted_at, Instant::min);
    let mut first_success: Option<Instant> = None;
    let mut all_recovered: Option<Instant> = Some(accepted_at);
    let mut errors = 0;
    let mut callers_with_errors = 0;
    for o in outcomes {
        let mut saw_error = false;
        let mut recovered = None;
        for &(end, ok) in &o.events {
            if end < killed_at {
                continue;
            }
            if !ok {
                errors += 1;
                saw_error = true;
            } else if end > restart_at {
                first_success = Some(first_success.map_or(end, |f| f.min(end)));
                if end >= accepted_at && recovered.is_none() {
                    recovered = Some(end);
                }
            }
        }
        if saw_error {
            callers_with_errors += 1;
        }
        all_recovered = match (all_recovered, recovered) {
            (Some(a), Some(r)) => Some(a.max(r)),
            _ => None,
        };
    }
    Outage {
        outage_s: (accepted_at - killed_at).as_secs_f64(),
        first_success_ms: first_success.map(|f| ms(signed_s(f, accepted_at))),
        all_recovered_ms: all_recovered.map(|a| ms((a - accepted_at).as_secs_f64())),
        errors,
        callers_with_errors,
        first_error: outcomes.iter().find_map(|o| o.first_error.clone()),
    }
}
