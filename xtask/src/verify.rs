//! `cargo xtask verify`: the architecture rules of docs/architecture.md, checked.
//!
//! Every failure names the rule, the place, and how to fix it. The same checks
//! run as a test (`xtask/tests/verify.rs`), so `cargo test` enforces them.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::Context as _;
use cargo_metadata::{DependencyKind, MetadataCommand, Package};

/// Arguments of `cargo xtask verify`.
#[derive(Debug, clap::Args)]
pub(crate) struct VerifyArgs {
    /// Workspace root to check (default: this workspace).
    #[arg(long)]
    root: Option<PathBuf>,
    /// Skip `cargo deny` even when it is installed.
    #[arg(long)]
    no_deny: bool,
}

/// The layer table: package, folder, and the pgstack crates it may depend on
/// (normal dependencies). `None` means any pgstack crate.
const LAYERS: &[(&str, &str, Option<&[&str]>)] = &[
    ("pgstack-config", "crates/config", Some(&[])),
    (
        "pgstack-resilience",
        "crates/resilience",
        Some(&["pgstack-config"]),
    ),
    (
        "pgstack-pool",
        "crates/pool",
        Some(&["pgstack-config", "pgstack-resilience"]),
    ),
    (
        "pgstack-connection",
        "crates/connection-manager",
        Some(&["pgstack-config", "pgstack-resilience", "pgstack-pool"]),
    ),
    (
        "pgstack-health",
        "crates/health-monitor",
        Some(&["pgstack-config", "pgstack-pool", "pgstack-connection"]),
    ),
    (
        "pgstack-migrations",
        "crates/migrations",
        Some(&["pgstack-config", "pgstack-resilience"]),
    ),
    (
        "pgstack-orchestrator",
        "crates/orchestrator",
        Some(&[
            "pgstack-config",
            "pgstack-resilience",
            "pgstack-pool",
            "pgstack-connection",
            "pgstack-health",
            "pgstack-migrations",
        ]),
    ),
    (
        "pgstack",
        "crates/pgstack",
        Some(&[
            "pgstack-config",
            "pgstack-resilience",
            "pgstack-pool",
            "pgstack-connection",
            "pgstack-health",
            "pgstack-migrations",
            "pgstack-orchestrator",
            "pgstack-macros",
        ]),
    ),
    ("pgstack-macros", "crates/macros", Some(&[])),
    ("pgstack-localpg", "crates/localpg", Some(&[])),
    ("pgstack-cli", "crates/cli", None),
    ("xtask", "xtask", None),
    ("pgstack-bench", "bench", None),
    ("pgstack-tests", "tests", Some(&["pgstack-localpg"])),
];

/// Lints the workspace must set, and the table they belong to.
const REQUIRED_LINTS: &[(&str, &str)] = &[
    ("rust", "missing_docs"),
    ("rust", "unreachable_pub"),
    ("clippy", "dbg_macro"),
    ("clippy", "todo"),
    ("clippy", "print_stdout"),
    ("clippy", "print_stderr"),
    ("clippy", "unwrap_used"),
    ("clippy", "expect_used"),
];

/// One broken rule.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Violation {
    /// Short name of the rule.
    pub(crate) rule: &'static str,
    /// Where it is broken.
    pub(crate) place: String,
    /// What is wrong and how to fix it.
    pub(crate) message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}] {}: {}", self.rule, self.place, self.message)
    }
}

pub(crate) fn run(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let root = match args.root {
        Some(root) => root,
        None => workspace_root()?,
    };
    let violations = check(&root)?;
    let deny = if args.no_deny {
        DenyOutcome::Skipped
    } else {
        run_cargo_deny(&root)?
    };
    #[allow(clippy::print_stdout)]
    {
        for v in &violations {
            println!("{v}");
        }
        match &deny {
            DenyOutcome::NotInstalled => {
                println!(
                    "note: cargo-deny is not installed; licenses, bans and sources not checked (cargo install cargo-deny)"
                )
            }
            DenyOutcome::Failed => println!(
                "[cargo-deny] deny.toml: `cargo deny check licenses bans sources` failed (output above)"
            ),
            DenyOutcome::Passed | DenyOutcome::Skipped => {}
        }
        if violations.is_empty() && !matches!(deny, DenyOutcome::Failed) {
            println!("verify: all architecture rules hold");
            Ok(ExitCode::SUCCESS)
        } else {
            println!(
                "verify: {} rule(s) broken",
                violations.len() + usize::from(matches!(deny, DenyOutcome::Failed))
            );
            Ok(ExitCode::FAILURE)
        }
    }
}

/// The root of the workspace this xtask belongs to.
pub(crate) fn workspace_root() -> anyhow::Result<PathBuf> {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .context("the xtask crate has no parent folder")
}

/// Runs every rule except cargo-deny and returns what is broken.
pub(crate) fn check(root: &Path) -> anyhow::Result<Vec<Violation>> {
    let metadata = MetadataCommand::new()
        .manifest_path(root.join("Cargo.toml"))
        .no_deps()
        .exec()
        .with_context(|| format!("cargo metadata failed in {}", root.display()))?;
    let members: Vec<&Package> = metadata.workspace_packages();
    let mut out = Vec::new();
    let member_names: BTreeSet<&str> = members.iter().map(|p| p.name.as_str()).collect();

    for package in &members {
        let folder = package
            .manifest_path
            .parent()
            .and_then(|dir| dir.strip_prefix(&metadata.workspace_root).ok())
            .map(|p| p.as_str().to_owned())
            .unwrap_or_default();
        let Some((_, expected_folder, allowed)) = LAYERS
            .iter()
            .find(|(name, _, _)| *name == package.name.as_str())
        else {
            out.push(Violation {
                rule: "layer-table",
                place: format!("{folder}/Cargo.toml"),
                message: format!(
                    "package `{}` is not in the layer table; add it to the table in docs/architecture.md and LAYERS in xtask/src/verify.rs, or rename it",
                    package.name
                ),
            });
            continue;
        };
        if folder != *expected_folder {
            out.push(Violation {
                rule: "folder-name",
                place: format!("{folder}/Cargo.toml"),
                message: format!(
                    "package `{}` must live in `{expected_folder}/` (folder names match crate names); move it",
                    package.name
                ),
            });
        }
        check_edges(package, allowed, &member_names, &folder, &mut out);
        check_crate_files(root, package, &folder, &mut out);
    }
    check_workspace_lints(root, &mut out)?;
    check_config_doc(root, &mut out)?;
    out.sort();
    Ok(out)
}

fn check_edges(
    package: &Package,
    allowed: &Option<&[&str]>,
    members: &BTreeSet<&str>,
    folder: &str,
    out: &mut Vec<Violation>,
) {
    for dep in &package.dependencies {
        if !members.contains(dep.name.as_str()) {
            continue;
        }
        let place = format!("{folder}/Cargo.toml");
        if dep.name == "pgstack-tests"
            && dep.kind != DependencyKind::Development
            && !matches!(package.name.as_str(), "xtask" | "pgstack-bench")
        {
            out.push(Violation {
                rule: "test-kit-dev-only",
                place,
                message: format!(
                    "`{}` depends on pgstack-tests as a {} dependency; the test kit may only be a [dev-dependencies] entry outside xtask and pgstack-bench",
                    package.name,
                    kind_name(dep.kind)
                ),
            });
            continue;
        }
        if dep.kind != DependencyKind::Normal {
            continue;
        }
        if dep.name == "pgstack-orchestrator"
            && !matches!(package.name.as_str(), "pgstack" | "pgstack-cli" | "xtask")
        {
            out.push(Violation {
                rule: "orchestrator-users",
                place,
                message: format!(
                    "`{}` depends on pgstack-orchestrator; only the facade (pgstack), pgstack-cli and xtask may; depend on the layer you need instead",
                    package.name
                ),
            });
            continue;
        }
        if let Some(allowed) = allowed
            && !allowed.contains(&dep.name.as_str())
        {
            let may = if allowed.is_empty() {
                "no pgstack crate".to_owned()
            } else {
                allowed.join(", ")
            };
            out.push(Violation {
                rule: "layering",
                place,
                message: format!(
                    "forbidden dependency `{}` -> `{}`; `{}` may depend only on: {may} (docs/architecture.md, Layers); move the code down a layer or remove the dependency",
                    package.name, dep.name, package.name
                ),
            });
        }
    }
}

fn kind_name(kind: DependencyKind) -> &'static str {
    match kind {
        DependencyKind::Normal => "normal",
        DependencyKind::Development => "dev",
        DependencyKind::Build => "build",
        _ => "other",
    }
}

fn check_crate_files(root: &Path, package: &Package, folder: &str, out: &mut Vec<Violation>) {
    let dir = root.join(folder);
    if !dir.join("README.md").is_file() {
        out.push(Violation {
            rule: "crate-readme",
            place: format!("{folder}/"),
            message: format!(
                "`{}` has no README.md; add one saying what the crate is for",
                package.name
            ),
        });
    }
    let entry = ["src/lib.rs", "src/main.rs"]
        .into_iter()
        .map(|p| dir.join(p))
        .find(|p| p.is_file());
    match entry.and_then(|p| std::fs::read_to_string(p).ok()) {
        Some(text) if text.lines().map(str::trim).find(|l| !l.is_empty()).is_some_and(|l| l.starts_with("//!")) => {}
        _ => out.push(Violation {
            rule: "crate-docs",
            place: format!("{folder}/src"),
            message: format!(
                "`{}` has no crate docs; start src/lib.rs (or src/main.rs) with `//!` lines that say what it is for",
                package.name
            ),
        }),
    }
    let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap_or_default();
    let lints_inherited = manifest.parse::<toml::Table>().ok().and_then(|t| {
        t.get("lints")
            .and_then(|l| l.get("workspace"))
            .and_then(toml::Value::as_bool)
    }) == Some(true);
    if !lints_inherited {
        out.push(Violation {
            rule: "workspace-lints",
            place: format!("{folder}/Cargo.toml"),
            message: format!(
                "`{}` does not inherit the workspace lints; add `[lints]\\nworkspace = true`",
                package.name
            ),
        });
    }
}

fn check_workspace_lints(root: &Path, out: &mut Vec<Violation>) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(root.join("Cargo.toml")).context("reading the root Cargo.toml")?;
    let table: toml::Table = text.parse().context("parsing the root Cargo.toml")?;
    let lints = table.get("workspace").and_then(|w| w.get("lints"));
    for (group, lint) in REQUIRED_LINTS {
        let level = lints
            .and_then(|l| l.get(*group))
            .and_then(|g| g.get(*lint))
            .and_then(|v| {
                v.as_str().map(str::to_owned).or_else(|| {
                    v.get("level")
                        .and_then(toml::Value::as_str)
                        .map(str::to_owned)
                })
            });
        if !matches!(level.as_deref(), Some("warn" | "deny" | "forbid")) {
            out.push(Violation {
                rule: "workspace-lints",
                place: "Cargo.toml".to_owned(),
                message: format!("`[workspace.lints.{group}] {lint}` must be warn, deny or forbid (CI denies warnings)"),
            });
        }
    }
    Ok(())
}

/// Every key of the configuration, as `section.key`, from the config crate itself.
pub(crate) fn config_keys() -> anyhow::Result<Vec<String>> {
    let value = serde_json::to_value(pgstack_config::DatabaseConfig::default())?;
    let mut keys = Vec::new();
    if let serde_json::Value::Object(top) = value {
        for (section, inner) in top {
            match inner {
                serde_json::Value::Object(fields) => {
                    keys.extend(fields.keys().map(|k| format!("{section}.{k}")));
                }
                _ => keys.push(section),
            }
        }
    }
    Ok(keys)
}

fn check_config_doc(root: &Path, out: &mut Vec<Violation>) -> anyhow::Result<()> {
    let path = root.join("docs/configuration.md");
    let Ok(doc) = std::fs::read_to_string(&path) else {
        out.push(Violation {
            rule: "config-doc",
            place: "docs/configuration.md".to_owned(),
            message: "missing; document every configuration key there".to_owned(),
        });
        return Ok(());
    };
    for key in config_keys()? {
        if !doc.contains(&format!("`{key}`")) {
            out.push(Violation {
                rule: "config-doc",
                place: "docs/configuration.md".to_owned(),
                message: format!(
                    "key `{key}` is not documented; add a row for it (written as `{key}`)"
                ),
            });
        }
    }
    Ok(())
}

enum DenyOutcome {
    Passed,
    Failed,
    NotInstalled,
    Skipped,
}

fn run_cargo_deny(root: &Path) -> anyhow::Result<DenyOutcome> {
    let installed = Command::new("cargo")
        .args(["deny", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        return Ok(DenyOutcome::NotInstalled);
    }
    let status = Command::new("cargo")
        .args(["deny", "--manifest-path"])
        .arg(root.join("Cargo.toml"))
        .args(["check", "licenses", "bans", "sources"])
        .status()
        .context("running cargo deny")?;
    Ok(if status.success() {
        DenyOutcome::Passed
    } else {
        DenyOutcome::Failed
    })
}
