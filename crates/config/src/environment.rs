//! The deployment environment and its profile.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The environment a service runs in. Each one selects a profile of defaults
/// (pool sizes, TLS mode, auto-migrate, health interval).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    /// A developer's machine: small pool, no TLS, migrations applied at start.
    #[default]
    Development,
    /// Automated tests: the smallest pool and a short health interval.
    Test,
    /// A production-like environment: TLS preferred, migrations run by hand.
    Staging,
    /// Production: TLS required, migrations run by hand, a large pool.
    Production,
}

impl Environment {
    /// Every environment, in the order of the profile table.
    pub const ALL: [Environment; 4] = [
        Environment::Development,
        Environment::Test,
        Environment::Staging,
        Environment::Production,
    ];

    /// The lowercase name used in `APP_ENV` and in `pgstack.toml` tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Environment::Development => "development",
            Environment::Test => "test",
            Environment::Staging => "staging",
            Environment::Production => "production",
        }
    }
}

impl fmt::Display for Environment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error for a name that is not one of the four environments.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown environment {given:?}: expected one of development, test, staging, production")]
pub struct UnknownEnvironment {
    /// What was given.
    pub given: String,
}

impl FromStr for Environment {
    type Err = UnknownEnvironment;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        Environment::ALL
            .into_iter()
            .find(|e| e.as_str() == lower)
            .ok_or_else(|| UnknownEnvironment {
                given: s.to_owned(),
            })
    }
}
