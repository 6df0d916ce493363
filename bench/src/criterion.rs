//! Case 3: what pgstack-resilience's wrappers add to a call, read from
//! criterion's output (`target/criterion/<group>/<function>/new/estimates.json`)
//! of `cargo bench -p pgstack-resilience`, which `cargo xtask bench` runs
//! first in full mode.

use std::path::Path;

use serde_json::{Map, Value};

use crate::Ctx;
use crate::report::{Entry, num};

/// The groups of crates/resilience/benches/overhead.rs that measure overhead.
const GROUPS: &[&str] = &["breaker", "retry", "timeout"];

pub(crate) fn run(ctx: &Ctx) -> anyhow::Result<Vec<Entry>> {
    crate::say("case 3: resilience overhead (criterion's output)");
    let mut entry = Entry::new("3. resilience overhead")
        .param(
            "source",
            "cargo bench -p pgstack-resilience (criterion medians)",
        )
        .column("median_ns", "median ns")
        .column("over_direct_ns", "ns over `direct`")
        .transposed();
    let mut figures = Map::new();
    let mut newest = None;
    for group in GROUPS {
        let dir = ctx.criterion_dir.join(group);
        let direct = median_ns(&dir.join("direct"));
        let Ok(functions) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut names: Vec<String> = functions
            .filter_map(Result::ok)
            .filter(|e| e.path().join("new/estimates.json").is_file())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for name in names {
            let path = dir.join(&name);
            let Some(median) = median_ns(&path) else {
                continue;
            };
            if let Ok(modified) =
                std::fs::metadata(path.join("new/estimates.json")).and_then(|m| m.modified())
            {
                newest = newest.max(Some(modified));
            }
            let mut f = Map::new();
            f.insert("median_ns".into(), num(median, 2));
            if name != "direct"
                && let Some(direct) = direct
            {
                f.insert("over_direct_ns".into(), num(median - direct, 2));
            }
            figures.insert(format!("{group}/{name}"), Value::Object(f));
        }
    }
    if figures.is_empty() {
        entry.note(if ctx.quick {
            "not run: --quick does not run `cargo bench -p pgstack-resilience`, and there is no \
             earlier criterion output"
        } else {
            "not run: no criterion output found; run `cargo bench -p pgstack-resilience`"
        });
        let mut f = Map::new();
        f.insert("status".into(), Value::from("not run"));
        entry.result("pgstack", f);
    } else {
        if let Some(t) = newest.and_then(|t| t.elapsed().ok()) {
            entry.note(format!(
                "criterion's newest estimate was written {} min before this run's end{}",
                t.as_secs() / 60,
                if ctx.quick {
                    " (quick mode reads an earlier `cargo bench` run)"
                } else {
                    ""
                }
            ));
        }
        entry.note(
            "`direct` is the bare ready future; the other lines wrap it (breaker in closed or \
             open state, the retry loop, the timeout), polled with a no-op waker, so the figures \
             are the wrappers' own cost.",
        );
        entry.result("pgstack", figures);
    }
    Ok(vec![entry])
}

/// `median.point_estimate` (ns) of one criterion benchmark folder.
fn median_ns(dir: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(dir.join("new/estimates.json")).ok()?;
    let value: Value = serde_json::from_str(&text).ok()?;
    value.get("median")?.get("point_estimate")?.as_f64()
}
