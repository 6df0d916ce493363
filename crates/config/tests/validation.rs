//! Every rule, fed bad input through the real loader (a temp file or the
//! injected environment); each problem must name the key, the value and the
//! source (file and line, or environment variable).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{at_line, env, fails, load_env, load_file, problem, toml};
use pgstack_config::{ConfigLoader, DatabaseConfig, Environment, Problem, Source};

/// Loads `section_key = value` from a file under [default] and returns the
/// problem about `key` (which must be reported from line 2).
fn file_problem(line: &str, key: &str) -> Problem {
    let file = toml(&format!("[default]\n{line}\n"));
    let error = fails(load_file(&file, &[]));
    let p = problem(&error, key).clone();
    assert_eq!(p.source, at_line(&file, 2), "{p}");
    assert!(error.to_string().contains("pgstack.toml:2"), "{error}");
    p
}

/// Loads one variable and returns the problem about `key`, which must name
/// the variable as its source.
fn env_problem(var: &str, value: &str, key: &str) -> Problem {
    let error = fails(load_env(&[(var, value)]));
    let p = problem(&error, key).clone();
    assert_eq!(p.source, env(var), "{p}");
    assert!(error.to_string().contains(var), "{error}");
    p
}

#[test]
fn unknown_environment_lists_the_valid_ones() {
    let p = env_problem("APP_ENV", "prod", "environment");
    assert_eq!(p.value.as_deref(), Some("prod"));
    assert!(p.message.contains("did you mean production?"), "{p}");
    assert!(
        p.message.contains("development, test, staging, production"),
        "{p}"
    );

    let p = file_problem("environment = \"qa\"", "environment");
    assert!(
        p.message.contains("development, test, staging, production"),
        "{p}"
    );
}

#[test]
fn environment_inside_an_environment_table_is_refused() {
    let file = toml("[default]\npool.max_size = 9\n\n[production]\nenvironment = \"test\"\n");
    let error = fails(load_file(&file, &[]));
    assert_eq!(problem(&error, "environment").source, at_line(&file, 5));
}

#[test]
fn unparsable_numbers_are_reported_with_their_source() {
    let p = env_problem("PGSTACK_POOL__MAX_SIZE", "twenty", "pool.max_size");
    assert_eq!(p.value.as_deref(), Some("twenty"));
    assert!(p.message.contains("whole number"), "{p}");

    let p = file_problem("retry.multiplier = \"double\"", "retry.multiplier");
    assert!(p.message.contains("expected a number"), "{p}");

    let p = file_problem("pool.min_idle = -1", "pool.min_idle");
    assert!(p.message.contains("whole number"), "{p}");

    let p = env_problem("DB_PORT", "99999", "primary.port");
    assert!(p.message.contains("1 to 65535"), "{p}");
}

#[test]
fn unparsable_durations_say_how_to_write_one() {
    let p = file_problem(
        "retry.initial_backoff = \"5 parsecs\"",
        "retry.initial_backoff",
    );
    assert!(p.message.contains("\"250ms\""), "{p}");
    let p = env_problem(
        "PGSTACK_POOL__ACQUIRE_TIMEOUT",
        "10",
        "pool.acquire_timeout",
    );
    assert!(p.message.contains("\"250ms\""), "{p}");
    let p = file_problem("pool.idle_timeout = 30", "pool.idle_timeout");
    assert!(p.message.contains("\"250ms\""), "{p}");
}

#[test]
fn unknown_values_of_a_choice_list_the_choices() {
    let p = file_problem("retry.jitter = \"ful\"", "retry.jitter");
    assert!(p.message.contains("did you mean full?"), "{p}");
    assert!(p.message.contains("none, full, equal, decorrelated"), "{p}");
    let p = env_problem("DB_SSLMODE", "sometimes", "tls.mode");
    assert!(p.message.contains("verify-full"), "{p}");
}

#[test]
fn unparsable_urls_are_reported_without_the_url() {
    let p = env_problem(
        "DATABASE_URL",
        "postgres://app:pw@db.internal:port/bills",
        "primary",
    );
    assert_eq!(p.value, None);
    assert!(p.message.contains("invalid port"), "{p}");

    let p = env_problem("DATABASE_URL", "mysql://db.internal/bills", "primary");
    assert!(p.message.contains("postgres://"), "{p}");

    let p = env_problem(
        "DATABASE_REPLICA_URLS",
        "postgres://r1/x,not a url",
        "replicas[1]",
    );
    assert!(p.message.contains("not a valid URL"), "{p}");

    let p = file_problem("primary = \"postgres://\"", "primary");
    assert!(p.message.contains("host"), "{p}");
}

#[test]
fn unknown_keys_are_named_with_a_suggestion() {
    let p = file_problem("pool.max_szie = 10", "pool.max_szie");
    assert!(p.message.contains("did you mean pool.max_size?"), "{p}");
    let p = env_problem("PGSTACK_RETRY__MAX_ATTEMPT", "3", "retry.max_attempt");
    assert!(
        p.message.contains("did you mean retry.max_attempts?"),
        "{p}"
    );
    let p = env_problem("PGSTACK_POLL__MAX_SIZE", "3", "poll");
    assert!(p.message.contains("did you mean pool?"), "{p}");
    let p = file_problem("primary.hots = \"db\"", "primary.hots");
    assert!(p.message.contains("did you mean primary.host?"), "{p}");
}

#[test]
fn unknown_tables_and_keys_outside_tables_are_named() {
    let file = toml("pool.max_size = 3\n\n[prod]\npool.max_size = 4\n");
    let error = fails(load_file(&file, &[]));
    let p = problem(&error, "prod");
    assert_eq!(p.source, at_line(&file, 3));
    assert!(p.message.contains("did you mean [production]?"), "{p}");
    let p = problem(&error, "pool");
    assert_eq!(p.source, at_line(&file, 1));
    assert!(p.message.contains("[default]"), "{p}");
}

#[test]
fn toml_syntax_errors_give_the_line() {
    let file = toml("[default]\npool.max_size = 3\nretry = {\n");
    let error = fails(load_file(&file, &[]));
    let p = problem(&error, "config file");
    assert!(
        matches!(
            p.source,
            Source::File {
                line: Some(3 | 4),
                ..
            }
        ),
        "{p}"
    );
    assert!(p.message.contains("not valid TOML"), "{p}");
}

#[test]
fn min_idle_above_max_size_names_both_sources() {
    let file = toml("[default]\npool.min_idle = 20\n");
    let error = fails(load_file(&file, &[("PGSTACK_POOL__MAX_SIZE", "8")]));
    let p = problem(&error, "pool.min_idle");
    assert_eq!(p.source, at_line(&file, 2));
    assert_eq!(p.value.as_deref(), Some("20"));
    assert!(
        p.message
            .contains("pool.max_size (8, from env PGSTACK_POOL__MAX_SIZE)"),
        "{p}"
    );
}

#[test]
fn pool_sizes_must_be_sensible() {
    let error = fails(load_env(&[
        ("PGSTACK_POOL__MAX_SIZE", "0"),
        ("PGSTACK_POOL__MIN_IDLE", "0"),
    ]));
    assert!(
        problem(&error, "pool.max_size")
            .message
            .contains("at least 1")
    );
    let p = env_problem("PGSTACK_POOL__MAX_SIZE", "20000", "pool.max_size");
    assert!(p.message.contains("at most 10000"), "{p}");
}

#[test]
fn zero_timeouts_are_refused() {
    for key in [
        "pool.acquire_timeout",
        "pool.connect_timeout",
        "keepalive.idle",
        "keepalive.interval",
        "retry.initial_backoff",
        "retry.budget_window",
        "circuit_breaker.open_duration",
        "circuit_breaker.slow_call_duration",
        "health.interval",
        "health.probe_timeout",
        "health.max_replica_lag",
        "migrations.lock_timeout",
        "migrations.lock_wait",
    ] {
        let p = file_problem(&format!("{key} = \"0s\""), key);
        assert!(p.message.contains("greater than zero"), "{p}");
    }
    for key in [
        "pool.idle_timeout",
        "pool.max_lifetime",
        "query.statement_timeout",
        "retry.deadline",
        "startup.wait_for_database",
    ] {
        let p = file_problem(&format!("{key} = \"0ms\""), key);
        assert!(p.message.contains("\"none\""), "{p}");
    }
}

#[test]
fn counts_that_must_be_positive() {
    for key in [
        "retry.max_attempts",
        "circuit_breaker.half_open_probes",
        "circuit_breaker.minimum_calls",
        "circuit_breaker.window_size",
        "keepalive.retries",
        "health.eject_after",
        "health.restore_after",
    ] {
        let var = format!("PGSTACK_{}", key.to_ascii_uppercase().replace('.', "__"));
        let error = fails(load_env(&[(var.as_str(), "0")]));
        let p = problem(&error, key);
        assert_eq!(p.source, env(&var));
        assert!(p.message.contains("at least 1"), "{p}");
    }
}

#[test]
fn migration_lock_wait_and_retries_are_bounded() {
    // the defaults: a few seconds, a few retries
    let config = load_env(&[]).unwrap().into_config();
    assert_eq!(
        config.migrations.lock_wait,
        std::time::Duration::from_secs(5)
    );
    assert_eq!(config.migrations.lock_retries, 4);

    let p = file_problem("migrations.lock_wait = \"0s\"", "migrations.lock_wait");
    assert_eq!(p.value.as_deref(), Some("0s"));
    assert!(p.message.contains("wait forever"), "{p}");
    let p = env_problem(
        "PGSTACK_MIGRATIONS__LOCK_WAIT",
        "30days",
        "migrations.lock_wait",
    );
    assert!(p.message.contains("largest lock_timeout"), "{p}");
    let p = env_problem(
        "PGSTACK_MIGRATIONS__LOCK_WAIT",
        "soon",
        "migrations.lock_wait",
    );
    assert_eq!(p.value.as_deref(), Some("soon"));

    let p = file_problem("migrations.lock_retries = 1000", "migrations.lock_retries");
    assert_eq!(p.value.as_deref(), Some("1000"));
    assert!(p.message.contains("at most 100"), "{p}");

    // no retries at all, and a long (but possible) wait, are fine
    let config = load_env(&[
        ("PGSTACK_MIGRATIONS__LOCK_RETRIES", "0"),
        ("PGSTACK_MIGRATIONS__LOCK_WAIT", "750ms"),
    ])
    .unwrap()
    .into_config();
    assert_eq!(config.migrations.lock_retries, 0);
    assert_eq!(
        config.migrations.lock_wait,
        std::time::Duration::from_millis(750)
    );
}

#[test]
fn production_requires_tls() {
    let file = toml("[production]\ntls.mode = \"prefer\"\n");
    let error = fails(load_file(&file, &[("APP_ENV", "production")]));
    let p = problem(&error, "tls.mode");
    assert_eq!(p.source, at_line(&file, 2));
    assert!(p.message.contains("verify-full"), "{p}");
    // disable from the environment, too
    let error = fails(load_env(&[
        ("APP_ENV", "production"),
        ("DB_SSLMODE", "disable"),
    ]));
    assert_eq!(problem(&error, "tls.mode").source, env("DB_SSLMODE"));
    // require is enough
    assert!(load_env(&[("APP_ENV", "production"), ("DB_SSLMODE", "require")]).is_ok());
}

#[test]
fn a_replica_must_not_be_the_primary() {
    let error = fails(load_env(&[
        ("DATABASE_URL", "postgres://app:pw@DB.internal:5432/bills"),
        (
            "DATABASE_REPLICA_URLS",
            "postgres://r1.internal/bills,postgres://reader:x@db.internal/bills",
        ),
    ]));
    let p = problem(&error, "replicas[1]");
    assert_eq!(p.source, env("DATABASE_REPLICA_URLS"));
    assert!(p.message.contains("points at the primary"), "{p}");
    // Another database on the same server is a different target.
    assert!(
        load_env(&[
            ("DATABASE_URL", "postgres://db.internal/bills"),
            ("DATABASE_REPLICA_URLS", "postgres://db.internal/reports"),
        ])
        .is_ok()
    );
}

#[test]
fn a_replica_listed_twice_is_refused() {
    let file = toml(
        "[default]\nreplicas = [\"postgres://r1.internal/bills\", \"postgres://r1.internal:5432/bills\"]\n",
    );
    let error = fails(load_file(&file, &[]));
    let p = problem(&error, "replicas[1]");
    assert_eq!(p.source, at_line(&file, 2));
    assert!(p.message.contains("replicas[0]"), "{p}");
}

#[test]
fn node_parts_must_be_present() {
    let error = fails(load_env(&[
        ("PGSTACK_PRIMARY__PORT", "0"),
        ("DB_USER", " "),
    ]));
    assert_eq!(
        problem(&error, "primary.port").source,
        env("PGSTACK_PRIMARY__PORT")
    );
    // DB_USER=" " is blank, so ignored: only the port is wrong.
    assert_eq!(error.problems().len(), 1, "{error}");
    let p = file_problem("primary.host = \"\"", "primary.host");
    assert!(p.message.contains("host"), "{p}");
}

#[test]
fn retry_backoff_bounds_and_multiplier() {
    let file = toml("[default]\nretry.initial_backoff = \"2s\"\nretry.max_backoff = \"500ms\"\n");
    let error = fails(load_file(&file, &[]));
    let p = problem(&error, "retry.max_backoff");
    assert_eq!(p.source, at_line(&file, 3));
    assert!(p.message.contains("retry.initial_backoff (2s, from"), "{p}");

    let p = env_problem("PGSTACK_RETRY__MULTIPLIER", "0.5", "retry.multiplier");
    assert!(p.message.contains("at least 1"), "{p}");
    let p = file_problem(
        "circuit_breaker.open_duration_multiplier = 0.9",
        "circuit_breaker.open_duration_multiplier",
    );
    assert!(p.message.contains("at least 1"), "{p}");
}

#[test]
fn fractions_must_lie_between_zero_and_one() {
    for (key, value) in [
        ("retry.budget_ratio", "1.5"),
        ("retry.budget_ratio", "-0.1"),
        ("circuit_breaker.failure_rate_threshold", "0"),
        ("circuit_breaker.failure_rate_threshold", "50"),
        ("circuit_breaker.slow_call_rate_threshold", "1.01"),
    ] {
        let p = file_problem(&format!("{key} = {value}"), key);
        assert!(p.message.contains("fraction"), "{p}");
        assert_eq!(p.value.as_deref(), Some(value));
    }
    // The edges are fine.
    assert!(
        load_env(&[
            ("PGSTACK_RETRY__BUDGET_RATIO", "0"),
            ("PGSTACK_CIRCUIT_BREAKER__FAILURE_RATE_THRESHOLD", "1")
        ])
        .is_ok()
    );
}

#[test]
fn circuit_breaker_windows_and_durations() {
    let file =
        toml("[default]\ncircuit_breaker.window_size = 5\ncircuit_breaker.minimum_calls = 10\n");
    let error = fails(load_file(&file, &[]));
    let p = problem(&error, "circuit_breaker.minimum_calls");
    assert_eq!(p.source, at_line(&file, 3));
    assert!(p.message.contains("never open"), "{p}");

    let file = toml(
        "[default]\ncircuit_breaker.sliding_window = \"time\"\ncircuit_breaker.window_duration = \"0s\"\n",
    );
    let error = fails(load_file(&file, &[]));
    assert_eq!(
        problem(&error, "circuit_breaker.window_duration").source,
        at_line(&file, 3)
    );

    let p = env_problem(
        "PGSTACK_CIRCUIT_BREAKER__MAX_OPEN_DURATION",
        "1s",
        "circuit_breaker.max_open_duration",
    );
    assert!(
        p.message.contains("circuit_breaker.open_duration (5s)"),
        "{p}"
    );
}

#[test]
fn pool_lifetime_jitter_and_health_probe_timeout() {
    let p = file_problem(
        "pool.max_lifetime_jitter = \"1h\"",
        "pool.max_lifetime_jitter",
    );
    assert!(p.message.contains("pool.max_lifetime (30m)"), "{p}");
    let p = env_problem(
        "PGSTACK_HEALTH__PROBE_TIMEOUT",
        "1m",
        "health.probe_timeout",
    );
    assert!(p.message.contains("overlap"), "{p}");
}

#[test]
fn application_name_and_root_certificate() {
    let long = "x".repeat(64);
    let p = env_problem(
        "PGSTACK_QUERY__APPLICATION_NAME",
        &long,
        "query.application_name",
    );
    assert!(p.message.contains("63 bytes"), "{p}");
    let p = file_problem("tls.root_cert = \"/nonexistent/ca.pem\"", "tls.root_cert");
    assert!(p.message.contains("no such file"), "{p}");
}

#[test]
fn migrations_dir_must_not_be_empty() {
    let p = file_problem("migrations.dir = \"\"", "migrations.dir");
    assert!(p.message.contains("folder"), "{p}");
}

#[test]
fn every_problem_is_reported_at_once() {
    let file = toml(
        "[default]\n\
         pool.min_idle = 60\n\
         pool.max_szie = 3\n\
         retry.initial_backoff = \"fast\"\n\
         circuit_breaker.half_open_probes = 0\n",
    );
    let error = fails(load_file(
        &file,
        &[
            ("APP_ENV", "production"),
            ("PGSTACK_RETRY__MULTIPLIER", "0.5"),
            ("PGSTACK_HEALTH__INTERVAL", "soon"),
            ("DB_SSLMODE", "prefer"),
            ("DATABASE_URL", "postgres://app:pw@:5432/x"),
        ],
    ));
    let keys: Vec<&str> = error.problems().iter().map(|p| p.key.as_str()).collect();
    for key in [
        "pool.min_idle",
        "pool.max_szie",
        "retry.initial_backoff",
        "retry.multiplier",
        "circuit_breaker.half_open_probes",
        "health.interval",
        "primary",
        "tls.mode",
    ] {
        assert!(keys.contains(&key), "{key} missing from:\n{error}");
    }
    assert_eq!(problem(&error, "pool.max_szie").source, at_line(&file, 3));
    assert_eq!(
        problem(&error, "retry.initial_backoff").source,
        at_line(&file, 4)
    );
    assert_eq!(
        problem(&error, "health.interval").source,
        env("PGSTACK_HEALTH__INTERVAL")
    );
    assert_eq!(problem(&error, "tls.mode").source, env("DB_SSLMODE"));
    assert_eq!(problem(&error, "pool.min_idle").source, at_line(&file, 2));
    assert!(
        error
            .to_string()
            .starts_with(&format!("invalid configuration ({} problems):", keys.len()))
    );
}

#[test]
fn a_bad_value_does_not_cause_false_reports_about_others() {
    // max_size is unparsable; min_idle must not be judged against a stand-in.
    let error = fails(load_env(&[
        ("PGSTACK_POOL__MAX_SIZE", "many"),
        ("PGSTACK_POOL__MIN_IDLE", "20"),
    ]));
    assert_eq!(error.problems().len(), 1, "{error}");
    assert_eq!(error.problems()[0].key, "pool.max_size");
}

#[test]
fn code_overrides_are_validated_and_named_as_code() {
    let error = ConfigLoader::new()
        .without_file()
        .env_source([("APP_ENV", "test")])
        .set("pool.max_size", 0)
        .with(|c| c.retry.multiplier = 0.1)
        .load()
        .unwrap_err();
    assert_eq!(problem(&error, "pool.max_size").source, Source::Code);
    assert_eq!(problem(&error, "retry.multiplier").source, Source::Code);
}

#[test]
fn validate_works_on_a_config_built_by_hand() {
    let mut config = DatabaseConfig::for_environment(Environment::Production);
    assert!(config.validate().is_ok());
    config.pool.min_idle = 100;
    config.tls.mode = pgstack_config::TlsMode::Disable;
    let error = config.validate().unwrap_err();
    assert_eq!(error.problems().len(), 2, "{error}");
    assert!(error.problems().iter().all(|p| p.source == Source::Code));
}

#[test]
fn every_profile_is_valid() {
    for environment in Environment::ALL {
        let mut config = DatabaseConfig::for_environment(environment);
        if environment == Environment::Production {
            config.tls.mode = pgstack_config::TlsMode::VerifyFull;
        }
        assert!(
            config.validate().is_ok(),
            "{environment}: {:?}",
            config.validate()
        );
    }
}

#[test]
fn an_unknown_environment_does_not_cause_false_reports_about_profile_keys() {
    // Meant for production (max_size 50); judged against development's 10 it
    // would look wrong.
    let error = fails(load_env(&[
        ("APP_ENV", "prodution"),
        ("PGSTACK_POOL__MIN_IDLE", "20"),
    ]));
    assert_eq!(error.problems().len(), 1, "{error}");
    assert!(
        problem(&error, "environment")
            .message
            .contains("did you mean production?")
    );
}

#[test]
fn a_dropped_node_part_does_not_cause_false_reports_about_replicas() {
    // DB_PORT (meant to be 6432) is bad, so the primary keeps the URL's
    // default 5432, like the replica; the replica must not be reported as
    // pointing at the primary.
    let error = fails(load_env(&[
        ("DATABASE_URL", "postgres://db.internal/bills"),
        ("DB_PORT", "six"),
        ("DATABASE_REPLICA_URLS", "postgres://db.internal:5432/bills"),
    ]));
    assert_eq!(error.problems().len(), 1, "{error}");
    assert_eq!(problem(&error, "primary.port").source, env("DB_PORT"));
}

#[test]
fn the_environment_can_be_set_as_a_key_in_code() {
    let config = ConfigLoader::new()
        .without_file()
        .env_source([("APP_ENV", "test")])
        .set("environment", "staging")
        .load()
        .unwrap();
    assert_eq!(config.environment, Environment::Staging);
    assert_eq!(config.pool.max_size, 15);
    let error = ConfigLoader::new()
        .without_file()
        .env_source(Vec::<(String, String)>::new())
        .set("environment", "qa")
        .load()
        .unwrap_err();
    assert_eq!(problem(&error, "environment").source, Source::Code);
}

#[test]
fn the_start_up_wait_is_read_from_the_environment_and_none_by_default() {
    let config = load_env(&[]).unwrap().config().clone();
    assert_eq!(config.startup.wait_for_database, None);

    let config = load_env(&[("PGSTACK_STARTUP__WAIT_FOR_DATABASE", "45s")])
        .unwrap()
        .config()
        .clone();
    assert_eq!(
        config.startup.wait_for_database,
        Some(std::time::Duration::from_secs(45))
    );

    let p = env_problem(
        "PGSTACK_STARTUP__WAIT_FOR_DATABASE",
        "0s",
        "startup.wait_for_database",
    );
    assert!(p.message.contains("\"none\""), "{p}");
}

#[test]
fn telemetry_query_text_is_a_boolean_per_profile_and_reported_with_its_source() {
    let p = env_problem(
        "PGSTACK_TELEMETRY__QUERY_TEXT",
        "sometimes",
        "telemetry.query_text",
    );
    assert_eq!(p.value.as_deref(), Some("sometimes"));
    let p = file_problem("telemetry.query_txt = true", "telemetry.query_txt");
    assert!(p.message.contains("query_text"), "{p}");

    // On by default except in production; a variable turns it on there.
    let production = [("APP_ENV", "production"), ("DB_SSLMODE", "verify-full")];
    let explained = load_env(&production).unwrap();
    assert!(!explained.config().telemetry.query_text);
    assert_eq!(
        explained.entry("telemetry.query_text").unwrap().source(),
        &pgstack_config::Source::Profile(pgstack_config::Environment::Production)
    );
    for environment in ["development", "test", "staging"] {
        let explained = load_env(&[("APP_ENV", environment)]).unwrap();
        assert!(explained.config().telemetry.query_text, "{environment}");
    }
    let mut on = production.to_vec();
    on.push(("PGSTACK_TELEMETRY__QUERY_TEXT", "true"));
    let explained = load_env(&on).unwrap();
    assert!(explained.config().telemetry.query_text);
    assert_eq!(
        explained.entry("telemetry.query_text").unwrap().source(),
        &env("PGSTACK_TELEMETRY__QUERY_TEXT")
    );
}

#[test]
fn shared_connections_at_or_above_max_size_names_both_sources() {
    let file = toml("[default]\nquery.shared_connections = 8\n");
    let error = fails(load_file(&file, &[("PGSTACK_POOL__MAX_SIZE", "8")]));
    let p = problem(&error, "query.shared_connections");
    assert_eq!(p.source, at_line(&file, 2));
    assert_eq!(p.value.as_deref(), Some("8"));
    assert!(
        p.message
            .contains("pool.max_size (8, from env PGSTACK_POOL__MAX_SIZE)"),
        "{p}"
    );
    assert!(p.message.contains("0: a connection per statement"), "{p}");
    // Below it, and zero, are fine; a negative count is not a count.
    let file = toml("[default]\nquery.shared_connections = 0\n");
    let config = load_file(&file, &[("PGSTACK_POOL__MAX_SIZE", "8")]).unwrap();
    assert_eq!(config.config().query.shared_connections, Some(0));
    file_problem("query.shared_connections = -1", "query.shared_connections");
}

#[test]
fn shared_connections_left_out_or_auto_is_shown_as_auto() {
    // Absent, it is chosen from pool.max_size: shown as `auto`, not `none`
    // (which would read as "no shared connections").
    let file = toml("[default]\npool.max_size = 8\n");
    let explained = load_file(&file, &[]).unwrap();
    assert_eq!(explained.config().query.shared_connections, None);
    let entry = explained.entry("query.shared_connections").unwrap();
    assert_eq!(entry.value(), "auto");
    // Written as `auto`, in the file or the environment: the same.
    let file = toml("[default]\nquery.shared_connections = \"auto\"\n");
    let explained = load_file(&file, &[]).unwrap();
    assert_eq!(explained.config().query.shared_connections, None);
    assert_eq!(
        explained.entry("query.shared_connections").unwrap().value(),
        "auto"
    );
    let explained = load_env(&[("PGSTACK_QUERY__SHARED_CONNECTIONS", "auto")]).unwrap();
    assert_eq!(explained.config().query.shared_connections, None);
    // Anything else that is not a count is refused with its source.
    let p = env_problem(
        "PGSTACK_QUERY__SHARED_CONNECTIONS",
        "lots",
        "query.shared_connections",
    );
    assert_eq!(p.value.as_deref(), Some("lots"));
    assert!(p.message.contains("whole number"), "{p}");
    assert!(p.message.contains("\"auto\""), "{p}");
}
