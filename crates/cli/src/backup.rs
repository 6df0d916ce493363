//! `pgstack backup` and `pgstack restore`: pg_dump and pg_restore in
//! the custom format (`-Fc`), with progress.
//!
//! The tools are found as the test kit finds PostgreSQL's binaries
//! ([`pgstack_localpg::PgBinaries`]). They get the connection through libpq's
//! environment variables (`PGHOST`, `PGPORT`, `PGUSER`, `PGDATABASE`,
//! `PGPASSWORD`, `PGSSLMODE`, ...) of the child process only, so the
//! password is never on a command line or in the output.
//!
//! `restore` over an existing database is guarded like `db-reset`: a
//! production environment, a non-local host or a database recorded as
//! production needs `--confirm-destroy DATABASE`. It runs in one transaction,
//! so a failed restore leaves the database as it was.

use std::collections::VecDeque;
use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use indicatif::ProgressBar;
use pgstack_config::{DatabaseConfig, Environment, NodeSettings, TlsMode};
use pgstack_localpg::PgBinaries;
use serde_json::json;

use crate::context::{CommonArgs, Context};
use crate::db::out;
use crate::guard::{self, Action};

/// Arguments of `pgstack backup`.
#[derive(Debug, clap::Args)]
pub struct BackupArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Write the dump here [default: target/backups/<database>-<UTC time>.dump]; never overwritten.
    #[arg(long, short, value_name = "FILE")]
    output: Option<PathBuf>,
}

/// Arguments of `pgstack restore`.
#[derive(Debug, clap::Args)]
pub struct RestoreArgs {
    /// The dump to restore: pg_dump's custom format, as `pgstack backup` writes it.
    file: PathBuf,
    /// Restore into this database on the same server [default: the configured database].
    #[arg(long, value_name = "DATABASE")]
    into: Option<String>,
    /// Create the database first (it must not exist yet).
    #[arg(long)]
    create: bool,
    /// Keep the dump's owners and privileges (the roles must exist on the target server).
    #[arg(long)]
    keep_owners: bool,
    /// Print what would happen and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Restore even over a production or non-local database; give its name to confirm.
    #[arg(long, value_name = "DATABASE")]
    confirm_destroy: Option<String>,
    #[command(flatten)]
    common: CommonArgs,
}

/// `restore` over an existing database, for the guard's messages.
const RESTORE: Action = Action {
    command: "restore",
    verb: "restore over",
    done: "restored over",
};

pub(crate) fn backup(args: BackupArgs) -> anyhow::Result<ExitCode> {
    let mut ctx = Context::resolve(&args.common)?;
    let output = match &args.output {
        Some(path) => path.clone(),
        None => default_output(guard::database_name(&ctx)),
    };
    if output.exists() {
        anyhow::bail!(
            "{} already exists; give another --output or move the file away (a backup never overwrites one)",
            output.display()
        );
    }
    let pg_dump = Tool::find("pg_dump")?;
    ctx.ensure_dev()?;
    let config = ctx.config.clone();
    let node = config.primary.clone();
    let target = node.redacted_url();

    let server = ctx.block_on(server_version(&config, &node))?;
    if pg_dump.major < server.major {
        anyhow::bail!(
            "{} is version {}, older than the server ({}); pg_dump cannot dump a newer server. \
             Install the PostgreSQL {} client tools (or newer) and point PGSTACK_PG_BINDIR at their bin folder",
            pg_dump.path.display(),
            pg_dump.version,
            server.version,
            server.major
        );
    }

    if let Some(parent) = output.parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating the folder {}", parent.display()))?;
    }
    let mut partial = output.clone().into_os_string();
    partial.push(".partial");
    let partial = PathBuf::from(partial);

    let mut cmd = pg_dump.command(&config, &node, "backup", ctx.timeout);
    cmd.arg("--format=custom")
        .arg("--verbose")
        .arg("--no-password")
        .arg(format!("--lock-wait-timeout={}", ctx.timeout.as_millis()))
        .arg("--file")
        .arg(&partial);
    if !ctx.json {
        ctx.say(&format!(
            "Backing up {target} with pg_dump {} (server {})...",
            pg_dump.version, server.version
        ))?;
    }
    let bar = crate::progress::bytes_spinner(ctx.json, "pg_dump");
    let started = Instant::now();
    let result = run_tool(cmd, "pg_dump", &bar, Some(&partial), ctx.verbose, |_| false);
    bar.finish_and_clear();
    if let Err(error) = result {
        let _ = std::fs::remove_file(&partial);
        return Err(error.context(format!(
            "backing up `{}` failed; nothing was written to {}",
            node.database,
            output.display()
        )));
    }
    std::fs::rename(&partial, &output)
        .with_context(|| format!("moving the finished dump to {}", output.display()))?;
    let bytes = std::fs::metadata(&output)?.len();
    let elapsed = started.elapsed();

    if ctx.json {
        let json = json!({
            "database": node.database,
            "target": target,
            "file": output,
            "bytes": bytes,
            "elapsed_ms": elapsed.as_millis() as u64,
            "server_version": server.version,
            "pg_dump_version": pg_dump.version,
        });
        out(&serde_json::to_string_pretty(&json)?)?;
    } else {
        out(&format!(
            "Backed up `{}` to {} ({}) in {:.1?}.\nRestore it with: {} restore {} --into <database> --create",
            node.database,
            output.display(),
            indicatif::HumanBytes(bytes),
            elapsed,
            crate::project::program(),
            output.display()
        ))?;
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn restore(args: RestoreArgs) -> anyhow::Result<ExitCode> {
    let mut ctx = Context::resolve(&args.common)?;
    if !args.file.is_file() {
        anyhow::bail!(
            "{} does not exist or is not a file; give the path of a dump written by `{} backup` (pg_dump --format=custom)",
            args.file.display(),
            crate::project::program()
        );
    }
    let pg_restore = Tool::find("pg_restore")?;
    let archive = Archive::inspect(&pg_restore, &args.file)?;
    let database = args
        .into
        .clone()
        .unwrap_or_else(|| guard::database_name(&ctx).to_owned());
    if database.is_empty() {
        anyhow::bail!("--into needs a database name");
    }
    if crate::db_reset::MAINTENANCE_DATABASES.contains(&database.as_str()) {
        anyhow::bail!(
            "refusing to restore into `{database}`: the server itself needs it; name an application database with --into"
        );
    }

    // Guards that need no server: nothing is started or touched before they pass.
    let confirmed = guard::confirmation(args.confirm_destroy.as_deref(), &database, RESTORE)?;
    let mut refusals = if args.create {
        Vec::new()
    } else {
        guard::static_refusals(&ctx, RESTORE)
    };
    if !refusals.is_empty() && !confirmed && !args.dry_run {
        return guard::refuse(RESTORE, &database, &refusals);
    }

    ctx.ensure_dev()?;
    let config = ctx.config.clone();
    let node = NodeSettings {
        database: database.clone(),
        ..config.primary.clone()
    };
    let target = node.redacted_url();
    let create = args.create;
    let (exists, recorded) = ctx.block_on(async {
        let admin = guard::admin_pool(&config, "restore")?;
        let exists = guard::database_exists(&admin, &database).await;
        admin.close();
        let exists = exists?;
        let recorded = if exists && !create {
            let pool = guard::pool_on(&config, node.clone(), "restore")?;
            let recorded = guard::recorded_environment(&pool).await;
            pool.close();
            recorded?
        } else {
            None
        };
        Ok((exists, recorded))
    })?;
    if create && exists {
        anyhow::bail!(
            "the database `{database}` already exists; leave out --create to restore over it, or choose a new name with --into; nothing was changed"
        );
    }
    if !create && !exists {
        anyhow::bail!(
            "the database `{database}` does not exist on {}; add --create to create it; nothing was changed",
            config.primary.redacted_url()
        );
    }
    if recorded == Some(Environment::Production) {
        refusals.push(guard::marked_production(&database));
    }
    let unconfirmed: &[guard::Refusal] = if confirmed { &[] } else { &refusals };
    if args.dry_run {
        print_restore_plan(&ctx, &args, &archive, &database, &target, unconfirmed)?;
        return Ok(ExitCode::SUCCESS);
    }
    if !unconfirmed.is_empty() {
        return guard::refuse(RESTORE, &database, unconfirmed);
    }

    if create {
        ctx.block_on(async {
            let admin = guard::admin_pool(&config, "restore")?;
            let result = async {
                let conn = guard::checkout(&admin, "restore: create database").await?;
                conn.batch_execute(&format!(
                    "CREATE DATABASE {}",
                    guard::quote_ident(&database)
                ))
                .await
                .with_context(|| {
                    format!("creating the database `{database}` (the role needs CREATEDB)")
                })?;
                anyhow::Ok(())
            }
            .await;
            admin.close();
            result
        })?;
    }

    let mut cmd = pg_restore.command(&config, &node, "restore", ctx.timeout);
    // Every statement waits at most --timeout for a lock (a DROP behind a busy table).
    cmd.env(
        "PGOPTIONS",
        format!("-c lock_timeout={}", ctx.timeout.as_millis()),
    );
    cmd.arg("--verbose")
        .arg("--no-password")
        .arg("--exit-on-error")
        .arg("--single-transaction")
        .arg(format!("--dbname=dbname={}", conninfo_quote(&database)));
    if !create {
        cmd.arg("--clean").arg("--if-exists");
    }
    if !args.keep_owners {
        cmd.arg("--no-owner").arg("--no-privileges");
    }
    cmd.arg(&args.file);
    if !ctx.json {
        ctx.say(&format!(
            "Restoring {} into {target} with pg_restore {}...",
            args.file.display(),
            pg_restore.version
        ))?;
    }
    let bar = crate::progress::bar(ctx.json, archive.entries, "restoring");
    let started = Instant::now();
    let result = run_tool(cmd, "pg_restore", &bar, None, ctx.verbose, |line| {
        line.starts_with("creating ")
            || line.starts_with("processing data")
            || line.starts_with("executing ")
    });
    bar.finish_and_clear();
    if let Err(error) = result {
        let mut note = format!(
            "restoring {} into `{database}` failed; it ran in one transaction, so nothing of it was applied",
            args.file.display()
        );
        if create {
            let dropped = ctx.block_on(async {
                let admin = guard::admin_pool(&config, "restore")?;
                let result = async {
                    let conn = guard::checkout(&admin, "restore: drop the new database").await?;
                    conn.batch_execute(&format!(
                        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                        guard::quote_ident(&database)
                    ))
                    .await?;
                    anyhow::Ok(())
                }
                .await;
                admin.close();
                result
            });
            note.push_str(match dropped {
                Ok(()) => ", and the database it created was dropped again",
                Err(_) => ", but the database it created could not be dropped: drop it by hand",
            });
        }
        return Err(error.context(note));
    }
    let elapsed = started.elapsed();

    // A dump of a production database brings its record along.
    let now_recorded = ctx.block_on(async {
        let pool = guard::pool_on(&config, node.clone(), "restore")?;
        let recorded = guard::recorded_environment(&pool).await;
        pool.close();
        recorded
    })?;

    if ctx.json {
        let json = json!({
            "file": args.file,
            "database": database,
            "target": target,
            "created": create,
            "entries": archive.entries,
            "source_database": archive.database,
            "recorded_environment": now_recorded.map(Environment::as_str),
            "elapsed_ms": elapsed.as_millis() as u64,
        });
        out(&serde_json::to_string_pretty(&json)?)?;
    } else {
        let mut text = format!(
            "Restored {} into the {}database `{database}` ({} entries) in {elapsed:.1?}.",
            args.file.display(),
            if create { "new " } else { "" },
            archive.entries,
        );
        if let Some(env) = now_recorded
            && env != ctx.config.environment
        {
            text.push_str(&format!(
                "\nNote: the restored data records environment `{env}` in pgstack_metadata; \
                 `{} migrate up` records `{}` instead.",
                crate::project::program(),
                ctx.config.environment
            ));
        }
        out(&text)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn print_restore_plan(
    ctx: &Context,
    args: &RestoreArgs,
    archive: &Archive,
    database: &str,
    target: &str,
    unconfirmed: &[guard::Refusal],
) -> anyhow::Result<()> {
    if ctx.json {
        let json = json!({
            "dry_run": true,
            "file": args.file,
            "database": database,
            "target": target,
            "create": args.create,
            "entries": archive.entries,
            "source_database": archive.database,
            "dumped_from": archive.server_version,
            "needs_confirmation": unconfirmed.iter().map(|r| r.0.clone()).collect::<Vec<_>>(),
        });
        return out(&serde_json::to_string_pretty(&json)?);
    }
    let mut plan = vec![format!(
        "restore --dry-run: nothing will be changed. The plan for {target}:"
    )];
    for r in unconfirmed {
        plan.push(format!(
            "  - the real run needs --confirm-destroy {database} because {}",
            r.0
        ));
    }
    if args.create {
        plan.push(format!("  1. create the database `{database}`"));
    } else {
        plan.push(format!(
            "  1. drop the objects of the dump that exist in `{database}` (other objects stay)"
        ));
    }
    plan.push(format!(
        "  2. restore {} entries from {} (database `{}`, PostgreSQL {}), in one transaction{}",
        archive.entries,
        args.file.display(),
        archive.database.as_deref().unwrap_or("?"),
        archive.server_version.as_deref().unwrap_or("?"),
        if args.keep_owners {
            ""
        } else {
            ", owned by the connecting role"
        }
    ));
    out(&plan.join("\n"))
}

/// `target/backups/<database>-<UTC time>.dump` of this workspace.
fn default_output(database: &str) -> PathBuf {
    let dev = crate::db::default_dir();
    let target = dev.parent().map(Path::to_path_buf).unwrap_or_default();
    let stamp: String = humantime::format_rfc3339_seconds(SystemTime::now())
        .to_string()
        .chars()
        .filter(|c| !matches!(c, '-' | ':'))
        .collect();
    let name: String = database
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    target.join("backups").join(format!("{name}-{stamp}.dump"))
}

/// A libpq conninfo value in single quotes.
fn conninfo_quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// The server's version.
struct ServerVersion {
    version: String,
    major: u32,
}

async fn server_version(
    config: &DatabaseConfig,
    node: &NodeSettings,
) -> anyhow::Result<ServerVersion> {
    let pool = guard::pool_on(config, node.clone(), "backup")?;
    let result = async {
        let conn = guard::checkout(&pool, "backup: server version").await?;
        let row = conn
            .query_one(
                "SELECT current_setting('server_version'), current_setting('server_version_num')::int",
                &[],
            )
            .await
            .context("reading the server's version")?;
        let num: i32 = row.get(1);
        anyhow::Ok(ServerVersion {
            version: row.get(0),
            major: u32::try_from(num / 10_000).unwrap_or(0),
        })
    }
    .await;
    pool.close();
    result
}

/// One PostgreSQL client tool and its version.
struct Tool {
    path: PathBuf,
    version: String,
    major: u32,
}

impl Tool {
    /// Finds `name` next to the server binaries the test kit would use.
    fn find(name: &str) -> anyhow::Result<Tool> {
        let bins = PgBinaries::find().with_context(|| format!("looking for {name}"))?;
        let path = bins.tool(name);
        if !path.is_file() {
            anyhow::bail!(
                "{name} is not in {}; install the PostgreSQL client tools, or point PGSTACK_PG_BINDIR at a folder holding them",
                bins.bindir().display()
            );
        }
        let output = Command::new(&path)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {} --version", path.display()))?;
        // "pg_dump (PostgreSQL) 15.8 (Debian 15.8-0+deb12u1)"
        let text = String::from_utf8_lossy(&output.stdout);
        let version = text
            .split_whitespace()
            .find(|word| word.starts_with(|c: char| c.is_ascii_digit()))
            .unwrap_or("unknown")
            .to_owned();
        let major = version
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        Ok(Tool {
            path,
            version,
            major,
        })
    }

    /// The tool with the connection in libpq's environment variables (the
    /// caller's `PG*` variables removed): the password goes in `PGPASSWORD`
    /// of the child, never on its command line.
    fn command(
        &self,
        config: &DatabaseConfig,
        node: &NodeSettings,
        what: &str,
        timeout: Duration,
    ) -> Command {
        let mut cmd = Command::new(&self.path);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                cmd.env_remove(key);
            }
        }
        cmd.env("PGHOST", &node.host)
            .env("PGPORT", node.port.to_string())
            .env("PGUSER", &node.user)
            .env("PGDATABASE", &node.database)
            .env(
                "PGAPPNAME",
                format!("{} {what}", config.query.application_name),
            )
            .env("PGSSLMODE", config.tls.mode.as_str())
            .env("PGCONNECT_TIMEOUT", timeout.as_secs().max(2).to_string())
            .env("LC_MESSAGES", "C")
            .stdin(Stdio::null());
        if let Some(password) = &node.password {
            cmd.env("PGPASSWORD", password.expose());
        }
        match &config.tls.root_cert {
            Some(root) => {
                cmd.env("PGSSLROOTCERT", root);
            }
            // pgstack verifies against the system's roots when no root certificate is set;
            // libpq does so from version 16 on when told `system`.
            None if matches!(config.tls.mode, TlsMode::VerifyCa | TlsMode::VerifyFull)
                && self.major >= 16 =>
            {
                cmd.env("PGSSLROOTCERT", "system");
            }
            None => {}
        }
        cmd
    }
}

/// What `pg_restore --list` tells about a dump.
struct Archive {
    entries: u64,
    database: Option<String>,
    server_version: Option<String>,
}

impl Archive {
    fn inspect(pg_restore: &Tool, file: &Path) -> anyhow::Result<Archive> {
        let output = Command::new(&pg_restore.path)
            .arg("--list")
            .arg(file)
            .stdin(Stdio::null())
            .env("LC_MESSAGES", "C")
            .output()
            .with_context(|| format!("running {} --list", pg_restore.path.display()))?;
        if !output.status.success() {
            anyhow::bail!(
                "{} is not a dump pg_restore {} can read ({}); give a file written by `{} backup` (pg_dump --format=custom); nothing was changed",
                file.display(),
                pg_restore.version,
                String::from_utf8_lossy(&output.stderr).trim(),
                crate::project::program()
            );
        }
        let text = String::from_utf8_lossy(&output.stdout);
        let header = |key: &str| {
            text.lines()
                .filter_map(|l| l.strip_prefix(';'))
                .find_map(|l| l.trim().strip_prefix(key))
                .map(|v| v.trim().to_owned())
        };
        Ok(Archive {
            entries: text
                .lines()
                .filter(|l| !l.trim().is_empty() && !l.starts_with(';'))
                .count() as u64,
            database: header("dbname:"),
            server_version: header("Dumped from database version:"),
        })
    }
}

/// Runs a tool whose `--verbose` lines on stderr drive `bar`'s message
/// (`counts` says which lines advance it); `watch` is a file whose size is
/// the bar's position. A failure carries the tool's error lines.
fn run_tool(
    mut cmd: Command,
    name: &str,
    bar: &ProgressBar,
    watch: Option<&Path>,
    verbose: bool,
    counts: fn(&str) -> bool,
) -> anyhow::Result<()> {
    cmd.stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("starting {name}"))?;
    let stderr = child
        .stderr
        .take()
        .with_context(|| format!("reading {name}'s messages"))?;
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut reader = std::io::BufReader::new(stderr);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf).trim_end().to_owned();
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let prefix = format!("{name}: ");
    let mut tail: VecDeque<String> = VecDeque::new();
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                let text = line.strip_prefix(&prefix).unwrap_or(&line).to_owned();
                if verbose {
                    bar.suspend(|| {
                        let mut err = std::io::stderr().lock();
                        let _ = std::io::Write::write_all(&mut err, format!("{line}\n").as_bytes());
                    });
                }
                if counts(&text) {
                    bar.inc(1);
                }
                bar.set_message(text);
                if tail.len() == 40 {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        if let Some(path) = watch
            && let Ok(meta) = std::fs::metadata(path)
        {
            bar.set_position(meta.len());
        }
    }
    let _ = reader.join();
    let status = child
        .wait()
        .with_context(|| format!("waiting for {name}"))?;
    if status.success() {
        return Ok(());
    }
    let problems: Vec<&str> = tail
        .iter()
        .map(String::as_str)
        .filter(|l| {
            l.contains("error")
                || l.contains("FATAL")
                || l.contains("DETAIL")
                || l.contains("HINT")
                || l.starts_with("Command was")
        })
        .collect();
    let shown: Vec<&str> = if problems.is_empty() {
        tail.iter()
            .rev()
            .take(10)
            .rev()
            .map(String::as_str)
            .collect()
    } else {
        problems
    };
    anyhow::bail!("{name} failed ({status}):\n  {}", shown.join("\n  "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conninfo_values_are_quoted() {
        assert_eq!(conninfo_quote("app"), "'app'");
        assert_eq!(conninfo_quote("it's"), "'it\\'s'");
        assert_eq!(conninfo_quote("a\\b"), "'a\\\\b'");
    }

    #[test]
    fn default_output_is_under_target_backups() {
        let path = default_output("bills/prod db");
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("bills_prod_db-"), "{name}");
        assert!(name.ends_with("Z.dump"), "{name}");
        assert!(!name.contains(':'), "{name}");
        assert_eq!(
            path.parent()
                .unwrap()
                .file_name()
                .unwrap()
                .to_string_lossy(),
            "backups"
        );
    }
}
