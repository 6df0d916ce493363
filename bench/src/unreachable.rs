//! Case 4: the database unreachable behind a black-holing proxy. pgstack:
//! time per call once its breaker is open. The peers: their default
//! behaviour, each wait capped with `tokio::time::timeout` (they would
//! otherwise wait 30 s, or forever).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pgstack::{Database, Route};
use pgstack_tests::{ChaosProxy, ProxyMode};
use serde_json::Value;

use crate::libs::{self, *};
use crate::load::Worker;
use crate::report::{Better, Entry, Medians};
use crate::{Ctx, DB};

const POOL: u32 = 16;

pub(crate) async fn run(ctx: &Ctx) -> anyhow::Result<Vec<Entry>> {
    crate::say("case 4: database unreachable (black hole)");
    let cap = if ctx.quick {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(3)
    };
    let mut entry = Entry::new("4. database unreachable (black-holing proxy)")
        .param("peer_wait_cap_s", cap.as_secs())
        .column("per_call_us", "per call µs")
        .column("p99_us", "p99 µs")
        .column("capped", "capped")
        .column("default_wait", "default wait")
        .headline("per_call_us", Better::Lower);

    let (figures, pool_figures, notes) = pgstack_open_breaker(ctx).await?;
    entry.result(PGSTACK, figures);
    entry.result(PGSTACK_POOL, pool_figures);
    for note in notes {
        entry.note(note);
    }

    for name in [RAW, BB8, DEADPOOL, SQLX] {
        let proxy = ChaosProxy::start(ctx.cluster.addr()).await?;
        let url = proxy.url(DB);
        let mut worker: Box<dyn FnMut() -> BoxedCall + Send> = match name {
            RAW => {
                let mut w = RawStatement::connect(&url, Query::Select1, 1).await?;
                w.call().await?;
                let w = Arc::new(tokio::sync::Mutex::new(w));
                Box::new(move || {
                    let w = Arc::clone(&w);
                    Box::pin(async move { w.lock().await.call().await })
                })
            }
            BB8 => {
                let pool = libs::bb8(&url, POOL).await?;
                boxed(Bb8Statement {
                    pool,
                    q: Query::Select1,
                    ids: Ids::new(1),
                })
                .await?
            }
            DEADPOOL => {
                let pool = libs::deadpool(&url, POOL as usize)?;
                boxed(DeadpoolStatement {
                    pool,
                    q: Query::Select1,
                    ids: Ids::new(1),
                })
                .await?
            }
            _ => {
                let pool = libs::sqlx(&url, POOL).await?;
                boxed(SqlxStatement {
                    pool,
                    q: Query::Select1,
                    ids: Ids::new(1),
                })
                .await?
            }
        };
        proxy.set_mode(ProxyMode::Blackhole);
        let mut m = Medians::default();
        let mut capped_calls = 0;
        let mut first_error = None;
        for _ in 0..ctx.repeats {
            let started = Instant::now();
            let result = libs::capped(cap, worker()).await;
            let elapsed = started.elapsed();
            m.push("per_call_us", 0, elapsed.as_secs_f64() * 1e6);
            if let Err(e) = result {
                if elapsed >= cap {
                    capped_calls += 1;
                }
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
        m.set("capped", format!("{capped_calls} of {}", ctx.repeats));
        m.set("default_wait", default_wait(name));
        if let Some(e) = first_error {
            m.set("first_error", e);
        }
        entry.result(name, m.into_map());
        crate::say(format!("  {name} measured"));
        drop(worker);
        drop(proxy);
    }
    entry.note(format!(
        "The peers' calls are cut off after {} s with `tokio::time::timeout`; left alone they \
         wait as the last column says. Each repetition is one call.",
        cap.as_secs()
    ));
    Ok(vec![entry])
}

type BoxedCall = std::pin::Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

/// Makes one successful call, then wraps the worker for repeated calls.
async fn boxed<W: Worker + Clone + Sync>(
    mut worker: W,
) -> anyhow::Result<Box<dyn FnMut() -> BoxedCall + Send>> {
    worker.call().await?;
    Ok(Box::new(move || {
        let mut w = worker.clone();
        Box::pin(async move { w.call().await })
    }))
}

fn default_wait(name: &str) -> &'static str {
    match name {
        RAW => "forever (no client timeout)",
        BB8 => "30 s (connection_timeout; the checkout ping hangs)",
        DEADPOOL => "forever (wait/create/recycle timeouts unset)",
        SQLX => "30 s (acquire_timeout; the acquire ping hangs)",
        _ => "",
    }
}

/// Drives calls through a black-holed pgstack until its breaker opens, then
/// times calls while it is open.
async fn pgstack_open_breaker(
    ctx: &Ctx,
) -> anyhow::Result<(
    serde_json::Map<String, Value>,
    serde_json::Map<String, Value>,
    Vec<String>,
)> {
    let proxy = ChaosProxy::start(ctx.cluster.addr()).await?;
    let mut config = libs::pgstack_config(&proxy.url(DB), POOL)?;
    // A round trip is bounded by statement_timeout + half the connect
    // timeout: 2.5 s, within the peers' 3 s cap, instead of the default 32.5 s.
    config.query.statement_timeout = Some(Duration::from_secs(2));
    config.pool.connect_timeout = Duration::from_secs(1);
    // The callers' deadline is the peers' 3 s cap too: a call waits for the
    // node only while its breaker will probe before then.
    config.retry.deadline = Some(Duration::from_secs(3));
    let db = libs::pgstack(config).await?;
    for _ in 0..10 {
        db.query_one("select-1", Route::Read, SELECT_1, &[]).await?;
    }
    proxy.set_mode(ProxyMode::Blackhole);

    let open = |db: &Database| {
        db.cluster()
            .primary()
            .circuit_breaker()
            .is_some_and(|b| !b.state().allows_calls())
    };
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let drivers: Vec<_> = (0..16)
        .map(|_| {
            let db = db.clone();
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let _ = db.query_one("select-1", Route::Read, SELECT_1, &[]).await;
                }
            })
        })
        .collect();
    let limit = Duration::from_secs(120);
    while !open(&db) && started.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let time_to_open = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for d in &drivers {
        d.abort();
    }
    let mut notes = vec![format!(
        "pgstack runs with `query.statement_timeout = 2s` and `pool.connect_timeout = 1s` here \
         (an attempt is bounded by their sum, 3 s; the defaults give 35 s) and the callers' \
         deadline of 3 s as `retry.deadline` (default 30 s): a call waits for an unavailable node \
         only while its breaker will probe before that deadline. Its breaker opened \
         {:.1} s after the black hole began, with 16 tasks calling; the figures are the calls \
         made while it was open.",
        time_to_open.as_secs_f64()
    )];
    let mut m = Medians::default();
    let mut pool_m = Medians::default();
    m.push("time_to_open_s", 2, time_to_open.as_secs_f64());
    if !open(&db) {
        notes.push(format!(
            "pgstack's breaker did not open within {} s",
            limit.as_secs()
        ));
    } else {
        let mut first_error = None;
        let mut successes = 0;
        let mut not_open = 0;
        for _ in 0..ctx.repeats {
            let mut lat = Vec::new();
            let rep_start = Instant::now();
            while lat.len() < 500 && rep_start.elapsed() < Duration::from_millis(400) {
                if !open(&db) {
                    not_open += 1;
                    break;
                }
                let t = Instant::now();
                let result = db.query_one("select-1", Route::Read, SELECT_1, &[]).await;
                lat.push(t.elapsed().as_secs_f64() * 1e6);
                match result {
                    Ok(_) => successes += 1,
                    Err(e) => {
                        first_error.get_or_insert_with(|| e.to_string());
                    }
                }
            }
            push_latencies(&mut m, lat);
            // The same node's pool on its own: `Pool::get` while the breaker is open.
            let pool = db.cluster().primary().pool();
            let mut lat = Vec::new();
            while lat.len() < 500 && open(&db) {
                let t = Instant::now();
                let result = pool.get("bench-checkout").await;
                lat.push(t.elapsed().as_secs_f64() * 1e6);
                if result.is_ok() {
                    successes += 1;
                }
            }
            push_latencies(&mut pool_m, lat);
        }
        m.set("successes", successes);
        if not_open > 0 {
            notes.push(format!(
                "pgstack's breaker left the open state during {not_open} repetition(s)"
            ));
        }
        if let Some(e) = first_error {
            m.set("first_error", e);
        }
    }
    m.set("capped", "no");
    m.set(
        "default_wait",
        "breaker open, next probe after the call's deadline: fails at once",
    );
    pool_m.set("capped", "no");
    pool_m.set("default_wait", "breaker open: fails at once");
    notes.push(
        "pgstack is `Database::query_one` through the facade; pgstack-pool is `Pool::get` on the \
         same node's pool, whose breaker is the node's breaker."
            .to_owned(),
    );
    let _ = db.shutdown(Duration::from_secs(1)).await;
    drop(proxy);
    Ok((m.into_map(), pool_m.into_map(), notes))
}

/// Median, p99 and count of one repetition's latencies (µs).
fn push_latencies(m: &mut Medians, mut lat: Vec<f64>) {
    lat.sort_by(f64::total_cmp);
    if !lat.is_empty() {
        m.push("per_call_us", 2, lat[lat.len() / 2]);
        let i = ((lat.len() as f64 * 0.99).ceil() as usize).clamp(1, lat.len()) - 1;
        m.push("p99_us", 2, lat[i]);
        m.push("calls", 0, lat.len() as f64);
    }
}
