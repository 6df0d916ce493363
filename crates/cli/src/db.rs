//! `pgstack db-up`, `db-down`, `db-status`: the local development PostgreSQL.
//!
//! The server lives under the project's `target/pgstack-dev/` (or `--dir` /
//! `PGSTACK_DEV_DIR`), persists across runs and is started from the machine's
//! PostgreSQL binaries (as the `postgres` user when run as root). The heavy
//! lifting is `pgstack_localpg::DevCluster`.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use pgstack_localpg::DevCluster;

/// Arguments of `pgstack db-up`.
#[derive(Debug, clap::Args)]
pub struct DbUpArgs {
    /// The folder of the development server [default: target/pgstack-dev].
    #[arg(long, env = "PGSTACK_DEV_DIR", value_name = "DIR")]
    dir: Option<PathBuf>,
}

/// Arguments of `pgstack db-down`.
#[derive(Debug, clap::Args)]
pub struct DbDownArgs {
    /// The folder of the development server [default: target/pgstack-dev].
    #[arg(long, env = "PGSTACK_DEV_DIR", value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Also delete the folder: data, log and state (the next db-up starts afresh).
    #[arg(long)]
    purge: bool,
}

/// Arguments of `pgstack db-status`.
#[derive(Debug, clap::Args)]
pub struct DbStatusArgs {
    /// The folder of the development server [default: target/pgstack-dev].
    #[arg(long, env = "PGSTACK_DEV_DIR", value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Print the status as one JSON object.
    #[arg(long)]
    json: bool,
}

/// The project's `target/pgstack-dev`.
pub(crate) fn default_dir() -> PathBuf {
    crate::project::current().dev_dir()
}

fn cluster(dir: Option<PathBuf>) -> DevCluster {
    DevCluster::open(dir.unwrap_or_else(default_dir))
}

/// Writes to standard output (the command's result, meant for the user).
pub(crate) fn out(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{text}")?;
    stdout.flush()?;
    Ok(())
}

pub(crate) fn up(args: DbUpArgs) -> anyhow::Result<ExitCode> {
    let dev = cluster(args.dir);
    let up = dev.up()?;
    if up.already_running {
        out(&format!(
            "The development PostgreSQL {} is already running on 127.0.0.1:{}.",
            up.server_version, up.port
        ))?;
    } else {
        out(&format!(
            "Started the development PostgreSQL {} on 127.0.0.1:{}.",
            up.server_version, up.port
        ))?;
    }
    out(&format!(
        "  data: {}\n  log:  {}\n\nexport DATABASE_URL={}",
        dev.data_dir().display(),
        dev.log_path().display(),
        up.url
    ))?;
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn down(args: DbDownArgs) -> anyhow::Result<ExitCode> {
    let dev = cluster(args.dir);
    if args.purge {
        let existed = dev.dir().exists();
        dev.purge()?;
        if existed {
            out(&format!(
                "Stopped the development PostgreSQL (if it ran) and deleted {}.",
                dev.dir().display()
            ))?;
        } else {
            out(&format!(
                "Nothing to delete: {} does not exist.",
                dev.dir().display()
            ))?;
        }
    } else if dev.down()? {
        out("Stopped the development PostgreSQL.")?;
    } else {
        out("The development PostgreSQL is not running.")?;
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn status(args: DbStatusArgs) -> anyhow::Result<ExitCode> {
    let dev = cluster(args.dir);
    let status = dev.status()?;
    if args.json {
        let json = serde_json::json!({
            "running": status.running,
            "initialized": status.initialized,
            "port": status.port,
            "url": status.url,
            "data_dir": status.data_dir,
            "log": status.log,
            "server_version": status.server_version,
        });
        out(&serde_json::to_string_pretty(&json)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let not_created = format!(
        "not created yet (run `{} db-up`)",
        crate::project::program()
    );
    let state = if status.running {
        "running"
    } else if status.initialized {
        "stopped"
    } else {
        &not_created
    };
    let mut text = format!("The development PostgreSQL is {state}.\n");
    if let Some(url) = &status.url {
        text.push_str(&format!("  url:     {url}\n"));
    }
    text.push_str(&format!("  data:    {}\n", status.data_dir.display()));
    text.push_str(&format!("  log:     {}\n", status.log.display()));
    if let Some(version) = &status.server_version {
        text.push_str(&format!("  version: {version}\n"));
    }
    out(text.trim_end())?;
    Ok(ExitCode::SUCCESS)
}
