//! Helpers shared by the integration tests: temp files, the injected
//! environment, and finding a problem by key.

#![allow(dead_code, unreachable_pub, missing_docs, clippy::unwrap_used)]

use std::path::PathBuf;

use pgstack_config::{ConfigError, ConfigLoader, Explained, Problem, Source};

/// A `pgstack.toml` with `content` in a fresh temp directory.
pub struct TempConfig {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
}

pub fn toml(content: &str) -> TempConfig {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pgstack.toml");
    std::fs::write(&path, content).unwrap();
    TempConfig { dir, path }
}

/// Loads with no file and only `vars` as the environment.
pub fn load_env(vars: &[(&str, &str)]) -> Result<Explained, ConfigError> {
    ConfigLoader::new()
        .without_file()
        .env_source(vars.iter().copied())
        .load_explained()
}

/// Loads `file` with only `vars` as the environment.
pub fn load_file(file: &TempConfig, vars: &[(&str, &str)]) -> Result<Explained, ConfigError> {
    ConfigLoader::new()
        .file(&file.path)
        .env_source(vars.iter().copied())
        .load_explained()
}

/// The error of a load that must fail.
pub fn fails(result: Result<Explained, ConfigError>) -> ConfigError {
    match result {
        Ok(explained) => {
            panic!("expected the configuration to be rejected; it loaded:\n{explained}")
        }
        Err(error) => error,
    }
}

/// The one problem about `key`; panics with every problem otherwise.
pub fn problem<'a>(error: &'a ConfigError, key: &str) -> &'a Problem {
    let found: Vec<&Problem> = error.problems().iter().filter(|p| p.key == key).collect();
    match found.as_slice() {
        [one] => one,
        _ => panic!("expected exactly one problem about {key}, got:\n{error}"),
    }
}

/// The source of a file line.
pub fn at_line(file: &TempConfig, line: usize) -> Source {
    Source::File {
        path: file.path.clone(),
        line: Some(line),
    }
}

pub fn env(name: &str) -> Source {
    Source::Env(name.to_owned())
}
