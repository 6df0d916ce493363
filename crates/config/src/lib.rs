//! Settings for pgstack: the types of every section, the environment
//! profiles, validation that reports every problem at once, and (feature
//! `load`, on by default) layered loading.
//!
//! Sources, later wins: built-in defaults → the environment's profile →
//! `pgstack.toml` (`[default]`, then the environment's own table) →
//! environment variables → overrides in code.
//!
//! ```
//! # #[cfg(feature = "load")]
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use pgstack_config::{ConfigLoader, Source};
//!
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("pgstack.toml");
//! std::fs::write(&path, "[default]\npool.max_size = 20\n\n[production]\npool.max_size = 80\n")?;
//!
//! let explained = ConfigLoader::new()
//!     .file(&path)
//!     // The process environment by default; a map here, as in tests.
//!     .env_source([
//!         ("APP_ENV", "production"),
//!         ("DATABASE_URL", "postgres://app:s3cret@db.internal/bills?sslmode=verify-full"),
//!         ("PGSTACK_RETRY__INITIAL_BACKOFF", "250ms"),
//!     ])
//!     .load_explained()?;
//!
//! let config = explained.config();
//! assert_eq!(config.pool.max_size, 80); // [production] over [default]
//! assert_eq!(config.pool.min_idle, 5); // the production profile
//! assert_eq!(config.retry.initial_backoff, std::time::Duration::from_millis(250));
//! assert_eq!(config.primary.password.as_ref().map(|p| p.expose()), Some("s3cret"));
//!
//! // Every value knows where it came from; passwords never print.
//! let max_size = explained.entry("pool.max_size").unwrap();
//! assert!(matches!(max_size.source(), Source::File { line: Some(5), .. }));
//! assert_eq!(explained.entry("primary.password").unwrap().value(), "********");
//! assert!(!format!("{explained} {config:?}").contains("s3cret"));
//!
//! // Every problem is reported at once, with its key and source.
//! let error = ConfigLoader::new()
//!     .without_file()
//!     .env_source([("PGSTACK_POOL__MAX_SIZE", "lots"), ("PGSTACK_RETRY__MULTIPLIER", "0.5")])
//!     .load()
//!     .unwrap_err();
//! assert_eq!(error.problems().len(), 2);
//! assert!(error.to_string().contains("pool.max_size = lots (env PGSTACK_POOL__MAX_SIZE)"));
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "load"))]
//! # fn main() {}
//! ```
//!
//! The plain types need no loader: depend on this crate with
//! `default-features = false` to use them (and [`DatabaseConfig::validate`])
//! without figment.

mod diagnose;
mod environment;
#[cfg(feature = "load")]
mod load;
mod problem;
mod secret;
mod settings;
mod validate;

pub use crate::diagnose::{
    ConnectExplanation, ConnectFailure, ConnectProblem, explain_connect_failure,
};
pub use crate::environment::{Environment, UnknownEnvironment};
#[cfg(feature = "load")]
pub use crate::load::{
    CONFIG_FILE_VAR, CONNECTION_VARS, ConfigLoader, DEFAULT_FILE, ENV_PREFIX, ENVIRONMENT_VARS,
    Entry, Explained,
};
pub use crate::problem::{ConfigError, Problem, Source};
pub use crate::secret::{Password, REDACTED};
pub use crate::settings::{
    CheckoutValidation, CircuitBreakerSettings, DatabaseConfig, FeatureSettings, HealthSettings,
    Jitter, KeepaliveSettings, MigrationSettings, NodeSettings, NodeUrlError, PoolSettings,
    Profile, QuerySettings, RetrySettings, SlidingWindow, StartupSettings, TelemetrySettings,
    TlsMode, TlsSettings,
};
pub use crate::validate::{MAX_LOCK_RETRIES, MAX_LOCK_WAIT, MAX_POOL_SIZE};
