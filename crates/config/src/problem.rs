//! What went wrong with a configuration, and where each value came from.

use std::fmt;
use std::path::PathBuf;

use serde::{Serialize, Serializer};

use crate::environment::Environment;

/// Where a configuration value came from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Source {
    /// The built-in default.
    Default,
    /// The profile of an environment (pool sizes, TLS mode, auto-migrate,
    /// health interval).
    Profile(Environment),
    /// A configuration file; `line` is 1-based, when known.
    File {
        /// The file, as it was named.
        path: PathBuf,
        /// The line of the key (or of its nearest enclosing key), when known.
        line: Option<usize>,
    },
    /// An environment variable, by name.
    Env(String),
    /// Set in code (`ConfigLoader::set`, `ConfigLoader::with`, or a
    /// `DatabaseConfig` built by hand and validated with
    /// [`DatabaseConfig::validate`](crate::DatabaseConfig::validate)).
    Code,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => f.write_str("default"),
            Source::Profile(environment) => write!(f, "profile {environment}"),
            Source::File {
                path,
                line: Some(line),
            } => write!(f, "{}:{line}", path.display()),
            Source::File { path, line: None } => write!(f, "{}", path.display()),
            Source::Env(name) => write!(f, "env {name}"),
            Source::Code => f.write_str("code"),
        }
    }
}

impl Serialize for Source {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// One thing wrong with a configuration: which key, what value, where it
/// came from, and what to do about it.
///
/// `value` is already redacted: a password is shown as
/// [`REDACTED`](crate::REDACTED), and a URL that could not be parsed is not
/// shown at all, since it may hold a password.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Problem {
    /// The key, as `section.key` (`pool.min_idle`, `replicas[1]`).
    pub key: String,
    /// The offending value as text, redacted; `None` when it is not shown.
    pub value: Option<String>,
    /// Where the value came from.
    pub source: Source,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl Problem {
    /// A problem with `key`, whose value (already redacted) is `value`.
    pub fn new(
        key: impl Into<String>,
        value: Option<String>,
        source: Source,
        message: impl Into<String>,
    ) -> Self {
        Problem {
            key: key.into(),
            value,
            source,
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            Some(value) => write!(
                f,
                "{} = {value} ({}): {}",
                self.key, self.source, self.message
            ),
            None => write!(f, "{} ({}): {}", self.key, self.source, self.message),
        }
    }
}

/// An invalid configuration: every problem that was found, not just the first.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    problems: Vec<Problem>,
}

impl ConfigError {
    /// An error holding `problems`; there should be at least one.
    pub fn new(problems: Vec<Problem>) -> Self {
        ConfigError { problems }
    }

    /// Every problem found, in the order of the configuration's keys.
    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }

    /// The problems, by value.
    pub fn into_problems(self) -> Vec<Problem> {
        self.problems
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.problems.as_slice() {
            [] => f.write_str("invalid configuration"),
            [one] => write!(f, "invalid configuration: {one}"),
            many => {
                write!(f, "invalid configuration ({} problems):", many.len())?;
                for problem in many {
                    write!(f, "\n  - {problem}")?;
                }
                Ok(())
            }
        }
    }
}
