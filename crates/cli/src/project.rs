//! Which project folder the commands work on, and how they name themselves.
//!
//! A project is the folder of a service: its `pgstack.toml`, its
//! `migrations/` and its `target/` (where the development server lives, in
//! `target/pgstack-dev/`, and backups go, in `target/backups/`). The
//! `pgstack` binary finds it from the current folder ([`Project::discover`]);
//! a service's own xtask may name it ([`Project::at`]).

use std::cell::RefCell;
use std::path::{Path, PathBuf};

/// The project folder a command works on, and how its messages name the
/// command line (`pgstack`, or `cargo xtask` when embedded).
///
/// ```
/// use pgstack_cli::Project;
///
/// let project = Project::at("/src/bills").named("cargo xtask");
/// assert_eq!(project.dev_dir(), std::path::Path::new("/src/bills/target/pgstack-dev"));
/// assert_eq!(project.program(), "cargo xtask");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Project {
    root: PathBuf,
    target: PathBuf,
    program: String,
}

/// The configuration file that marks a project's root.
const CONFIG_FILE: &str = "pgstack.toml";

impl Project {
    /// The project around the current folder (see [`Project::discover_from`]),
    /// named `pgstack`.
    pub fn discover() -> Project {
        let here = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
        Project::discover_from(&here)
    }

    /// The project around `dir`: the nearest folder, from `dir` upwards, that
    /// holds a `pgstack.toml` or the `Cargo.toml` of a Cargo workspace (one
    /// with a `[workspace]` table); failing that, the nearest that holds any
    /// `Cargo.toml` (a single-package project); failing that, `dir` itself.
    ///
    /// So in a service workspace, every member folder finds the workspace
    /// root, and a folder with its own `pgstack.toml` is a project of its own.
    pub fn discover_from(dir: &Path) -> Project {
        let marked = dir.ancestors().find(|d| {
            d.join(CONFIG_FILE).is_file() || is_workspace_manifest(&d.join("Cargo.toml"))
        });
        let root = marked
            .or_else(|| dir.ancestors().find(|d| d.join("Cargo.toml").is_file()))
            .unwrap_or(dir);
        Project::at(root)
    }

    /// The project in `root`, named `pgstack`, with its build folder
    /// `root/target`.
    pub fn at(root: impl Into<PathBuf>) -> Project {
        let root = root.into();
        Project {
            target: root.join("target"),
            root,
            program: "pgstack".to_owned(),
        }
    }

    /// How messages name the command line, e.g. `"cargo xtask"` in "run
    /// `cargo xtask migrate validate`".
    pub fn named(mut self, program: impl Into<String>) -> Project {
        self.program = program.into();
        self
    }

    /// Uses `target` instead of `root/target` for the development server
    /// (`target/pgstack-dev`) and backups (`target/backups`).
    ///
    /// The `pgstack` binary never reads `CARGO_TARGET_DIR` for this: a target
    /// folder shared by several projects would make them share one
    /// development server and its database.
    pub fn with_target_dir(mut self, target: impl Into<PathBuf>) -> Project {
        self.target = target.into();
        self
    }

    /// The project's folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// How messages name the command line.
    pub fn program(&self) -> &str {
        &self.program
    }

    /// The development server's folder: `target/pgstack-dev` (unless
    /// `--dev-dir` or `PGSTACK_DEV_DIR` names another).
    pub fn dev_dir(&self) -> PathBuf {
        self.target.join("pgstack-dev")
    }

    /// Where backups go by default: `target/backups`.
    pub fn backups_dir(&self) -> PathBuf {
        self.target.join("backups")
    }

    /// A relative folder (such as `migrations.dir`) is looked up in the
    /// current folder, then in the project's root.
    pub fn resolve(&self, dir: &Path) -> PathBuf {
        if dir.is_absolute() || dir.exists() {
            return dir.to_path_buf();
        }
        self.root.join(dir)
    }

    /// The project's `pgstack.toml`, when it has one.
    pub(crate) fn config_file(&self) -> Option<PathBuf> {
        let file = self.root.join(CONFIG_FILE);
        file.is_file().then_some(file)
    }
}

/// Whether `path` is a `Cargo.toml` with a `[workspace]` table.
fn is_workspace_manifest(path: &Path) -> bool {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| text.parse::<toml::Table>().ok())
        .is_some_and(|table| table.contains_key("workspace"))
}

thread_local! {
    /// The project of the command running on this thread (set by
    /// [`crate::Command::run_with`] for the length of the command).
    static CURRENT: RefCell<Option<Project>> = const { RefCell::new(None) };
}

/// The project of the running command: the one given to
/// [`crate::Command::run_with`], else the one around the current folder.
pub(crate) fn current() -> Project {
    CURRENT
        .with(|slot| slot.borrow().clone())
        .unwrap_or_else(Project::discover)
}

/// How messages name the command line of the running command.
pub(crate) fn program() -> String {
    CURRENT
        .with(|slot| slot.borrow().as_ref().map(|p| p.program.clone()))
        .unwrap_or_else(|| "pgstack".to_owned())
}

/// Makes `project` the current one until the guard is dropped.
pub(crate) fn enter(project: Project) -> Entered {
    let previous = CURRENT.with(|slot| slot.replace(Some(project)));
    Entered { previous }
}

/// Restores the previous project when dropped.
pub(crate) struct Entered {
    previous: Option<Project>,
}

impl Drop for Entered {
    fn drop(&mut self) {
        let previous = self.previous.take();
        CURRENT.with(|slot| *slot.borrow_mut() = previous);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn a_workspace_member_finds_the_workspace_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        touch(
            &root.join("Cargo.toml"),
            "[workspace]\nmembers = [\"crates/api\"]\n",
        );
        touch(
            &root.join("crates/api/Cargo.toml"),
            "[package]\nname = \"api\"\n",
        );
        std::fs::create_dir_all(root.join("crates/api/src")).unwrap();
        let found = Project::discover_from(&root.join("crates/api/src"));
        assert_eq!(found.root(), root);
        assert_eq!(found.dev_dir(), root.join("target/pgstack-dev"));
    }

    #[test]
    fn a_pgstack_toml_marks_a_project_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        touch(&root.join("Cargo.toml"), "[workspace]\n");
        touch(&root.join("services/bills/pgstack.toml"), "[default]\n");
        std::fs::create_dir_all(root.join("services/bills/migrations")).unwrap();
        let found = Project::discover_from(&root.join("services/bills/migrations"));
        assert_eq!(found.root(), root.join("services/bills"));
        assert_eq!(
            found.config_file(),
            Some(root.join("services/bills/pgstack.toml"))
        );
    }

    #[test]
    fn a_single_package_is_its_own_project_and_a_bare_folder_is_itself() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        touch(&root.join("app/Cargo.toml"), "[package]\nname = \"app\"\n");
        std::fs::create_dir_all(root.join("app/src")).unwrap();
        assert_eq!(
            Project::discover_from(&root.join("app/src")).root(),
            root.join("app")
        );
        std::fs::create_dir_all(root.join("loose")).unwrap();
        assert_eq!(
            Project::discover_from(&root.join("loose")).root(),
            root.join("loose")
        );
    }

    #[test]
    fn relative_folders_resolve_against_the_root_when_not_here() {
        let project = Project::at("/nowhere/app");
        assert_eq!(
            project.resolve(Path::new("no-such-folder-here")),
            Path::new("/nowhere/app/no-such-folder-here")
        );
        assert_eq!(project.resolve(Path::new("/abs")), Path::new("/abs"));
    }

    #[test]
    fn the_current_project_is_scoped() {
        assert_eq!(program(), "pgstack");
        {
            let _entered = enter(Project::at("/x").named("cargo xtask"));
            assert_eq!(program(), "cargo xtask");
            assert_eq!(current().root(), Path::new("/x"));
        }
        assert_eq!(program(), "pgstack");
    }
}
