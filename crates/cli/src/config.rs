//! `pgstack config`: the effective configuration and where each value came from.
//!
//! Loads the configuration exactly as a service would (defaults, the
//! environment's profile, `pgstack.toml`, environment variables), then prints
//! every key with its value and its source: `default`, `profile <env>`,
//! `file:line`, `env VAR`. Passwords are redacted. On invalid input it prints
//! every problem and exits with 1.

use std::path::PathBuf;
use std::process::ExitCode;

use pgstack_config::{ConfigError, Environment};

/// Arguments of `pgstack config`.
#[derive(Debug, clap::Args)]
pub struct ConfigArgs {
    /// The environment: development, test, staging or production
    /// (default: APP_ENV / PGSTACK_ENV, then the file's [default], then development).
    #[arg(long = "env", value_name = "ENV")]
    env: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Read this file instead of ./pgstack.toml (or the file named by PGSTACK_CONFIG, or the project's pgstack.toml).
    #[arg(long, value_name = "PATH")]
    file: Option<PathBuf>,
}

#[allow(clippy::print_stderr)]
pub(crate) fn run(args: ConfigArgs) -> anyhow::Result<ExitCode> {
    let mut loader = crate::context::loader(args.file.as_deref());
    if let Some(name) = &args.env {
        match name.parse::<Environment>() {
            Ok(environment) => loader = loader.environment(environment),
            Err(error) => {
                eprintln!("error: --env: {error}");
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    match loader.load_explained() {
        Ok(explained) => {
            let text = if args.json {
                format!("{}\n", serde_json::to_string_pretty(&explained)?)
            } else {
                explained.to_string()
            };
            write_stdout(&text)?;
            Ok(ExitCode::SUCCESS)
        }
        Err(error) => {
            if args.json {
                write_stdout(&format!(
                    "{}\n",
                    serde_json::to_string_pretty(&problems_json(&error))?
                ))?;
            } else {
                let count = error.problems().len();
                let noun = if count == 1 { "problem" } else { "problems" };
                eprintln!("invalid configuration: {count} {noun}");
                for problem in error.problems() {
                    eprintln!("  - {problem}");
                }
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Writes to stdout; a closed pipe (`| head`) is not an error.
fn write_stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(error) if error.kind() != std::io::ErrorKind::BrokenPipe => Err(error.into()),
        _ => Ok(()),
    }
}

/// `{"valid": false, "problems": [{key, value, source, message}]}`; values
/// are already redacted by the config crate.
fn problems_json(error: &ConfigError) -> serde_json::Value {
    let problems: Vec<serde_json::Value> = error
        .problems()
        .iter()
        .map(|p| {
            serde_json::json!({
                "key": p.key,
                "value": p.value,
                "source": p.source.to_string(),
                "message": p.message,
            })
        })
        .collect();
    serde_json::json!({ "valid": false, "problems": problems })
}
