//! What every database command shares: the options `--env`, `--database-url`,
//! `--config`, `--json`, `--verbose`, `--timeout`, the loaded configuration, and
//! which database the command works on.
//!
//! With no primary configured (no `--database-url`, `DATABASE_URL`,
//! `DB_HOST`/`DB_PORT`/`DB_NAME`, nor a primary in `pgstack.toml` for the
//! environment), the target is the local development cluster under the
//! project's `target/pgstack-dev/`, started when needed.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::str::FromStr as _;
use std::time::Duration;

use anyhow::Context as _;
use pgstack_config::{ConfigLoader, DatabaseConfig, Environment, NodeSettings, Source};
use pgstack_localpg::DevCluster;

/// Options shared by the commands that talk to a database.
#[derive(Debug, Clone, clap::Args)]
pub struct CommonArgs {
    /// Environment: development, test, staging or production [default: APP_ENV / PGSTACK_ENV, else development].
    #[arg(long, value_name = "ENV")]
    pub(crate) env: Option<String>,
    /// The database to work on [default: DATABASE_URL, else the local development cluster].
    #[arg(long, value_name = "URL", hide_env_values = true)]
    pub(crate) database_url: Option<String>,
    /// The configuration file [default: PGSTACK_CONFIG, else pgstack.toml here, else the project's].
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// The migrations folder [default: migrations.dir of the configuration, `migrations`].
    #[arg(long, value_name = "DIR")]
    pub(crate) migrations: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    pub(crate) json: bool,
    /// Say more about each step.
    #[arg(long, short)]
    pub(crate) verbose: bool,
    /// Give up after this long (e.g. 30s, 2m).
    #[arg(long, value_name = "DURATION", default_value = "120s", value_parser = humantime::parse_duration)]
    pub(crate) timeout: Duration,
    /// The folder of the development server [default: the project's target/pgstack-dev].
    #[arg(long, env = "PGSTACK_DEV_DIR", value_name = "DIR")]
    pub(crate) dev_dir: Option<PathBuf>,
}

/// Which database a command works on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// The local development cluster (started if it was not running).
    Dev {
        /// The development cluster's folder.
        dir: PathBuf,
    },
    /// The database the configuration (`--database-url`, `DATABASE_URL`, `DB_*`, pgstack.toml) names.
    Configured,
}

/// The shared state of one command run.
pub(crate) struct Context {
    pub(crate) config: DatabaseConfig,
    pub(crate) target: Target,
    pub(crate) json: bool,
    pub(crate) verbose: bool,
    pub(crate) timeout: Duration,
}

impl Context {
    /// Loads the configuration and decides the target, without touching any
    /// server. `dev_url` is filled in later by [`Context::ensure_dev`].
    pub(crate) fn resolve(args: &CommonArgs) -> anyhow::Result<Context> {
        let mut loader = loader(args.config.as_deref());
        if let Some(name) = &args.env {
            let environment = Environment::from_str(name)?;
            loader = loader.environment(environment);
        }
        if let Some(url) = &args.database_url {
            // The error never repeats the URL: it may hold a password.
            let node = NodeSettings::from_url(url).context("--database-url is not a usable URL")?;
            loader = loader.with(move |config| config.primary = node);
        }
        if let Some(dir) = args.migrations.clone() {
            loader = loader.with(move |config| config.migrations.dir = dir);
        }
        let explained = loader.load_explained()?;
        // The primary is configured when its host, port or database came from
        // somewhere a person put it: --database-url, DATABASE_URL, DB_HOST /
        // DB_PORT / DB_NAME, pgstack.toml or a PGSTACK_PRIMARY__… variable.
        let configured = explained.entries().iter().any(|entry| {
            matches!(
                entry.key(),
                "primary.host" | "primary.port" | "primary.database"
            ) && !matches!(entry.source(), Source::Default | Source::Profile(_))
        });
        let config = explained.into_config();
        let target = if configured {
            Target::Configured
        } else {
            Target::Dev {
                dir: args.dev_dir.clone().unwrap_or_else(crate::db::default_dir),
            }
        };
        Ok(Context {
            config,
            target,
            json: args.json,
            verbose: args.verbose,
            timeout: args.timeout,
        })
    }

    /// For the development target: starts the cluster if needed and points
    /// the configuration's primary at its database.
    pub(crate) fn ensure_dev(&mut self) -> anyhow::Result<()> {
        if let Target::Dev { dir } = &self.target {
            let dev = DevCluster::open(dir.clone());
            let up = dev.up()?;
            if !up.already_running {
                self.say(&format!(
                    "Started the development PostgreSQL {} on 127.0.0.1:{}.",
                    up.server_version, up.port
                ))?;
            }
            self.config.primary = NodeSettings::from_url(&up.url)?;
        }
        Ok(())
    }

    /// A line for a person: on stderr when the output is JSON, so stdout stays parseable.
    pub(crate) fn say(&self, text: &str) -> anyhow::Result<()> {
        if self.json {
            let mut err = std::io::stderr().lock();
            writeln!(err, "{text}")?;
        } else {
            crate::db::out(text)?;
        }
        Ok(())
    }

    /// Builds a current-thread runtime and runs `work` on it, bounded by `--timeout`.
    pub(crate) fn block_on<T>(
        &self,
        work: impl Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<T> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let timeout = self.timeout;
        runtime.block_on(async move {
            match tokio::time::timeout(timeout, work).await {
                Ok(result) => result,
                Err(_) => anyhow::bail!(
                    "gave up after {} (--timeout); nothing after the last step shown was done",
                    humantime::format_duration(timeout)
                ),
            }
        })
    }
}

/// A relative folder (such as `migrations.dir`) is looked up in the current
/// folder, then in the project's root.
pub(crate) fn resolve_dir(dir: &Path) -> PathBuf {
    crate::project::current().resolve(dir)
}

/// A configuration loader reading `file` when given; otherwise
/// `PGSTACK_CONFIG`, else `./pgstack.toml`, else the project's `pgstack.toml`
/// (when the command runs in a folder below the project's root).
pub(crate) fn loader(file: Option<&Path>) -> ConfigLoader {
    let loader = ConfigLoader::new();
    if let Some(file) = file {
        return loader.file(file);
    }
    let here = Path::new(pgstack_config::DEFAULT_FILE);
    if std::env::var_os(pgstack_config::CONFIG_FILE_VAR).is_none()
        && !here.is_file()
        && let Some(file) = crate::project::current().config_file()
    {
        return loader.file(file);
    }
    loader
}
