//! Loading: the order of the sources, each source's spelling, and where each
//! value is reported to come from.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{at_line, env, fails, load_env, load_file, problem, toml};
use pgstack_config::{ConfigLoader, DatabaseConfig, Environment, Jitter, Profile, Source, TlsMode};

#[test]
fn nothing_set_gives_the_development_defaults() {
    let explained = load_env(&[]).unwrap();
    assert_eq!(explained.config(), &DatabaseConfig::default());
    assert_eq!(
        explained.entry("environment").unwrap().source(),
        &Source::Default
    );
    assert_eq!(
        explained.entry("retry.max_attempts").unwrap().source(),
        &Source::Default
    );
    assert_eq!(
        explained.entry("pool.min_idle").unwrap().source(),
        &Source::Profile(Environment::Development)
    );
}

#[test]
fn each_environment_applies_its_profile() {
    for environment in Environment::ALL {
        let explained = load_env(&[
            ("APP_ENV", environment.as_str()),
            // production refuses to run without TLS
            ("DB_SSLMODE", "verify-full"),
        ])
        .unwrap();
        let config = explained.config();
        let profile = Profile::of(environment);
        assert_eq!(config.environment, environment);
        assert_eq!(config.pool.min_idle, profile.min_idle);
        assert_eq!(config.pool.max_size, profile.max_size);
        assert_eq!(config.migrations.auto_migrate, profile.auto_migrate);
        assert_eq!(config.health.interval, profile.health_interval);
        assert_eq!(
            explained.entry("environment").unwrap().source(),
            &env("APP_ENV")
        );
        assert_eq!(
            explained.entry("pool.max_size").unwrap().source(),
            &Source::Profile(environment)
        );
    }
}

#[test]
fn pgstack_env_wins_over_app_env_and_code_wins_over_both() {
    let vars = [("APP_ENV", "staging"), ("PGSTACK_ENV", "test")];
    let explained = load_env(&vars).unwrap();
    assert_eq!(explained.config().environment, Environment::Test);
    assert_eq!(
        explained.entry("environment").unwrap().source(),
        &env("PGSTACK_ENV")
    );

    let config = ConfigLoader::new()
        .without_file()
        .env_source(vars)
        .environment(Environment::Development)
        .load()
        .unwrap();
    assert_eq!(config.environment, Environment::Development);
}

#[test]
fn the_environment_table_of_the_file_wins_over_its_default_table() {
    let file = toml(
        "[default]\n\
         pool.max_size = 20\n\
         query.application_name = \"bills\"\n\
         \n\
         [staging]\n\
         pool.max_size = 30\n\
         \n\
         [production]\n\
         pool.max_size = 80\n",
    );
    let explained = load_file(&file, &[("APP_ENV", "staging")]).unwrap();
    assert_eq!(explained.config().pool.max_size, 30);
    assert_eq!(
        explained.entry("pool.max_size").unwrap().source(),
        &at_line(&file, 6)
    );
    assert_eq!(explained.config().query.application_name, "bills");
    assert_eq!(
        explained.entry("query.application_name").unwrap().source(),
        &at_line(&file, 3)
    );
    // The staging profile still applies where the file is silent.
    assert_eq!(explained.config().pool.min_idle, 3);

    let explained = load_file(&file, &[("APP_ENV", "test")]).unwrap();
    assert_eq!(explained.config().pool.max_size, 20);
    assert_eq!(
        explained.entry("pool.max_size").unwrap().source(),
        &at_line(&file, 2)
    );
}

#[test]
fn the_file_can_choose_the_environment_and_variables_win_over_it() {
    let file = toml("[default]\nenvironment = \"test\"\n");
    let explained = load_file(&file, &[]).unwrap();
    assert_eq!(explained.config().environment, Environment::Test);
    assert_eq!(
        explained.entry("environment").unwrap().source(),
        &at_line(&file, 2)
    );

    let explained = load_file(&file, &[("APP_ENV", "staging")]).unwrap();
    assert_eq!(explained.config().environment, Environment::Staging);
}

#[test]
fn environment_variables_win_over_the_file_and_code_wins_over_them() {
    let file = toml("[default]\npool.max_size = 20\nretry.max_attempts = 4\n");
    let vars = [
        ("PGSTACK_POOL__MAX_SIZE", "25"),
        ("PGSTACK_RETRY__MAX_ATTEMPTS", "6"),
    ];
    let explained = ConfigLoader::new()
        .file(&file.path)
        .env_source(vars)
        .set("retry.max_attempts", 7)
        .load_explained()
        .unwrap();
    assert_eq!(explained.config().pool.max_size, 25);
    assert_eq!(
        explained.entry("pool.max_size").unwrap().source(),
        &env("PGSTACK_POOL__MAX_SIZE")
    );
    assert_eq!(explained.config().retry.max_attempts, 7);
    assert_eq!(
        explained.entry("retry.max_attempts").unwrap().source(),
        &Source::Code
    );
}

#[test]
fn a_closure_in_code_runs_last_and_its_changes_are_reported_as_code() {
    let explained = ConfigLoader::new()
        .without_file()
        .env_source([("PGSTACK_POOL__MAX_SIZE", "25")])
        .with(|config| {
            config.pool.max_size = 12;
            config.primary.password = Some(pgstack_config::Password::new("from-vault"));
        })
        .load_explained()
        .unwrap();
    assert_eq!(explained.config().pool.max_size, 12);
    assert_eq!(
        explained.entry("pool.max_size").unwrap().source(),
        &Source::Code
    );
    assert_eq!(
        explained.entry("primary.password").unwrap().source(),
        &Source::Code
    );
    assert_eq!(
        explained.entry("pool.min_idle").unwrap().source(),
        &Source::Profile(Environment::Development)
    );
}

#[test]
fn any_key_can_be_set_with_a_pgstack_variable() {
    let explained = load_env(&[
        ("PGSTACK_RETRY__INITIAL_BACKOFF", "250ms"),
        ("PGSTACK_RETRY__JITTER", "decorrelated"),
        ("PGSTACK_RETRY__BUDGET_RATIO", "0.5"),
        ("PGSTACK_FEATURES__READ_REPLICAS", "false"),
        ("PGSTACK_QUERY__APPLICATION_NAME", "12345"),
        ("PGSTACK_HEALTH__INTERVAL", "10m"),
        ("PGSTACK_PRIMARY__HOST", "db.internal"),
        ("PGSTACK_PRIMARY__PORT", "6432"),
        // Not configuration: no double underscore.
        ("PGSTACK_LOG", "debug"),
    ])
    .unwrap();
    let config = explained.config();
    assert_eq!(config.retry.initial_backoff, Duration::from_millis(250));
    assert_eq!(config.retry.jitter, Jitter::Decorrelated);
    assert_eq!(config.retry.budget_ratio, 0.5);
    assert!(!config.features.read_replicas);
    assert_eq!(config.query.application_name, "12345");
    assert_eq!(config.health.interval, Duration::from_secs(600));
    assert_eq!(config.primary.host, "db.internal");
    assert_eq!(config.primary.port, 6432);
    assert_eq!(
        explained.entry("retry.initial_backoff").unwrap().source(),
        &env("PGSTACK_RETRY__INITIAL_BACKOFF")
    );
    assert_eq!(
        explained.entry("primary.port").unwrap().source(),
        &env("PGSTACK_PRIMARY__PORT")
    );
}

#[test]
fn database_url_sets_the_whole_primary_and_db_variables_override_its_parts() {
    let file = toml(
        "[default]\nprimary = { host = \"file-host\", user = \"file-user\", password = \"file-pw\" }\n",
    );
    let explained = load_file(
        &file,
        &[
            ("DATABASE_URL", "postgres://app@db.internal:6432/bills"),
            ("DB_NAME", "ledger"),
        ],
    )
    .unwrap();
    let primary = &explained.config().primary;
    assert_eq!(primary.host, "db.internal");
    assert_eq!(primary.port, 6432);
    assert_eq!(primary.user, "app");
    assert_eq!(primary.database, "ledger");
    // The URL names no password, so the file's is gone too: a URL is the whole node.
    assert_eq!(primary.password, None);
    assert_eq!(
        explained.entry("primary.host").unwrap().source(),
        &env("DATABASE_URL")
    );
    assert_eq!(
        explained.entry("primary.database").unwrap().source(),
        &env("DB_NAME")
    );
}

#[test]
fn db_variables_alone_build_the_primary_over_the_file() {
    let file = toml("[default]\n\n[default.primary]\nhost = \"file-host\"\ndatabase = \"bills\"\n");
    let explained = load_file(
        &file,
        &[
            ("DB_HOST", "env-host"),
            ("DB_PORT", "6543"),
            ("DB_USER", "svc"),
            ("DB_PASSWORD", " spaces kept "),
            ("DB_NAME", ""), // blank: ignored
        ],
    )
    .unwrap();
    let primary = &explained.config().primary;
    assert_eq!(primary.host, "env-host");
    assert_eq!(primary.port, 6543);
    assert_eq!(primary.user, "svc");
    assert_eq!(primary.database, "bills");
    assert_eq!(primary.password.as_ref().unwrap().expose(), " spaces kept ");
    assert_eq!(
        explained.entry("primary.database").unwrap().source(),
        &at_line(&file, 5)
    );
    assert_eq!(
        explained.entry("primary.port").unwrap().source(),
        &env("DB_PORT")
    );
}

#[test]
fn db_sslmode_and_the_url_parameter_accept_libpq_spellings() {
    for (given, expected) in [
        ("disable", TlsMode::Disable),
        ("allow", TlsMode::Prefer),
        ("prefer", TlsMode::Prefer),
        ("REQUIRE", TlsMode::Require),
        ("verify-ca", TlsMode::VerifyCa),
        ("verify_full", TlsMode::VerifyFull),
    ] {
        let config = load_env(&[("DB_SSLMODE", given)]).unwrap().into_config();
        assert_eq!(config.tls.mode, expected, "DB_SSLMODE={given}");
    }
    let explained = load_env(&[(
        "DATABASE_URL",
        "postgres://db.internal/bills?sslmode=verify-full",
    )])
    .unwrap();
    assert_eq!(explained.config().tls.mode, TlsMode::VerifyFull);
    assert_eq!(
        explained.entry("tls.mode").unwrap().source(),
        &env("DATABASE_URL")
    );
    // DB_SSLMODE comes after DATABASE_URL.
    let config = load_env(&[
        (
            "DATABASE_URL",
            "postgres://db.internal/bills?sslmode=verify-full",
        ),
        ("DB_SSLMODE", "require"),
    ])
    .unwrap()
    .into_config();
    assert_eq!(config.tls.mode, TlsMode::Require);
}

#[test]
fn replica_urls_come_from_a_comma_separated_variable() {
    let explained = load_env(&[(
        "DATABASE_REPLICA_URLS",
        "postgres://r1.internal/bills, postgres://app:pw@r2.internal:6432/bills,",
    )])
    .unwrap();
    let replicas = &explained.config().replicas;
    assert_eq!(replicas.len(), 2);
    assert_eq!(replicas[0].host, "r1.internal");
    assert_eq!(replicas[1].port, 6432);
    assert_eq!(replicas[1].password.as_ref().unwrap().expose(), "pw");
    assert_eq!(
        explained.entry("replicas[1]").unwrap().source(),
        &env("DATABASE_REPLICA_URLS")
    );
    assert_eq!(
        explained.entry("replicas[1]").unwrap().value(),
        "postgres://app:********@r2.internal:6432/bills"
    );
}

#[test]
fn replicas_in_the_file_may_be_urls_or_tables() {
    let file = toml(
        "[default]\n\
         primary = \"postgres://db.internal/bills\"\n\
         \n\
         [[default.replicas]]\n\
         host = \"r1.internal\"\n\
         database = \"bills\"\n\
         \n\
         [[default.replicas]]\n\
         url = \"postgres://r2.internal/bills\"\n\
         port = 6432\n",
    );
    let explained = load_file(&file, &[]).unwrap();
    let replicas = &explained.config().replicas;
    assert_eq!(replicas.len(), 2);
    assert_eq!(
        (replicas[0].host.as_str(), replicas[0].port),
        ("r1.internal", 5432)
    );
    assert_eq!(
        (replicas[1].host.as_str(), replicas[1].port),
        ("r2.internal", 6432)
    );
    assert_eq!(
        explained.entry("primary.host").unwrap().source(),
        &at_line(&file, 2)
    );
    // A list is reported where it starts: the first [[default.replicas]].
    assert_eq!(
        explained.entry("replicas[0]").unwrap().source(),
        &at_line(&file, 4)
    );
    assert_eq!(
        explained.entry("replicas[1]").unwrap().source(),
        &at_line(&file, 4)
    );
}

#[test]
fn durations_are_human_readable_and_optional_ones_can_be_turned_off() {
    let file = toml(
        "[default]\n\
         pool.acquire_timeout = \"250ms\"\n\
         pool.idle_timeout = \"none\"\n\
         pool.leak_detection_threshold = \"2m\"\n\
         query.statement_timeout = \"off\"\n",
    );
    let explained = load_file(&file, &[("PGSTACK_RETRY__DEADLINE", "none")]).unwrap();
    let config = explained.config();
    assert_eq!(config.pool.acquire_timeout, Duration::from_millis(250));
    assert_eq!(config.pool.idle_timeout, None);
    assert_eq!(
        config.pool.leak_detection_threshold,
        Some(Duration::from_secs(120))
    );
    assert_eq!(config.query.statement_timeout, None);
    assert_eq!(config.retry.deadline, None);
    assert_eq!(
        explained.entry("pool.idle_timeout").unwrap().value(),
        "none"
    );
    assert_eq!(
        explained.entry("pool.idle_timeout").unwrap().source(),
        &at_line(&file, 3)
    );
}

#[test]
fn a_missing_default_file_is_fine_but_a_named_one_must_exist() {
    // `ConfigLoader::new()` looks for ./pgstack.toml, which the crate does not have.
    assert!(
        ConfigLoader::new()
            .env_source([("APP_ENV", "test")])
            .load()
            .is_ok()
    );

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.toml");
    let error = ConfigLoader::new()
        .file(&missing)
        .env_source(Vec::<(String, String)>::new())
        .load()
        .unwrap_err();
    let p = problem(&error, "config file");
    assert_eq!(p.source, Source::Code);
    assert!(p.message.contains("no such file"), "{p}");

    let missing = missing.display().to_string();
    let error = fails(load_env_with_config(&missing));
    assert_eq!(problem(&error, "config file").source, env("PGSTACK_CONFIG"));
}

fn load_env_with_config(
    path: &str,
) -> Result<pgstack_config::Explained, pgstack_config::ConfigError> {
    ConfigLoader::new()
        .env_source([("PGSTACK_CONFIG", path)])
        .load_explained()
}

#[test]
fn pgstack_config_names_the_file() {
    let file = toml("[default]\npool.max_size = 33\n");
    let path = file.path.display().to_string();
    let explained = load_env_with_config(&path).unwrap();
    assert_eq!(explained.config().pool.max_size, 33);
    assert_eq!(
        explained.entry("pool.max_size").unwrap().source(),
        &at_line(&file, 2)
    );
}

#[test]
fn the_process_environment_is_the_default_source() {
    // Reads std::env without changing it: whatever the process has must load
    // or fail the same way twice.
    let first = ConfigLoader::new()
        .without_file()
        .load()
        .map_err(|e| e.to_string());
    let second = ConfigLoader::new()
        .without_file()
        .load()
        .map_err(|e| e.to_string());
    assert_eq!(first, second);
}

#[test]
fn for_tests_is_kept() {
    let config = DatabaseConfig::for_tests("postgres://u:p@127.0.0.1:1/x").unwrap();
    assert_eq!(config.environment, Environment::Test);
    assert_eq!(config.primary.port, 1);
    assert!(config.validate().is_ok());
}
