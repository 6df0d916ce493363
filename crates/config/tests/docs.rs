//! docs/configuration.md lists every key, and its example file loads.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{fails, load_file, problem, toml};
use pgstack_config::{ConfigLoader, DatabaseConfig, Environment, TlsMode};

fn doc() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/configuration.md");
    std::fs::read_to_string(path).unwrap()
}

/// Every key as `section.key`, plus the keys that are not tables.
fn keys() -> Vec<String> {
    let value = serde_json::to_value(DatabaseConfig::default()).unwrap();
    let mut keys = Vec::new();
    for (section, inner) in value.as_object().unwrap() {
        match inner.as_object() {
            Some(fields) => keys.extend(fields.keys().map(|k| format!("{section}.{k}"))),
            None => keys.push(section.clone()),
        }
    }
    keys
}

#[test]
fn every_key_is_documented_with_its_variable() {
    let doc = doc();
    let keys = keys();
    assert!(keys.len() >= 60, "{keys:?}");
    for key in keys {
        assert!(
            doc.contains(&format!("`{key}`")),
            "docs/configuration.md lacks `{key}`"
        );
        if let Some((section, field)) = key.split_once('.') {
            let var = format!(
                "PGSTACK_{}__{}",
                section.to_uppercase(),
                field.to_uppercase()
            );
            assert!(doc.contains(&var), "docs/configuration.md lacks {var}");
        }
    }
}

#[test]
fn every_key_is_in_the_explained_view() {
    let explained = ConfigLoader::new()
        .without_file()
        .env_source(Vec::<(String, String)>::new())
        .load_explained()
        .unwrap();
    for key in keys() {
        assert!(explained.entry(&key).is_some(), "no entry for {key}");
    }
}

#[test]
fn the_example_file_loads() {
    let doc = doc();
    let start = doc.find("```toml\n").unwrap() + "```toml\n".len();
    let end = start + doc[start..].find("```").unwrap();
    let file = toml(&doc[start..end]);
    for environment in ["development", "test", "staging"] {
        let config = load_file(&file, &[("APP_ENV", environment)])
            .unwrap()
            .into_config();
        assert_eq!(config.query.application_name, "bills");
        assert_eq!(config.primary.host, "localhost");
    }
    let test = load_file(&file, &[("APP_ENV", "test")])
        .unwrap()
        .into_config();
    assert_eq!(test.health.interval, std::time::Duration::from_secs(2));

    // Production names a CA file this machine does not have: that is the
    // only problem.
    let error = fails(load_file(
        &file,
        &[("APP_ENV", "production"), ("DB_PASSWORD", "x")],
    ));
    assert_eq!(error.problems().len(), 1, "{error}");
    problem(&error, "tls.root_cert");

    let ca = file.dir.path().join("ca.pem");
    std::fs::write(&ca, "").unwrap();
    let config = ConfigLoader::new()
        .file(&file.path)
        .env_source([("APP_ENV", "production"), ("DB_PASSWORD", "x")])
        .with(move |c| c.tls.root_cert = Some(ca))
        .load()
        .unwrap();
    assert_eq!(config.environment, Environment::Production);
    assert_eq!(config.primary.host, "primary.internal");
    assert_eq!(config.primary.database, "bills");
    assert_eq!(config.replicas.len(), 2);
    assert_eq!(config.tls.mode, TlsMode::VerifyFull);
    assert_eq!(config.pool.max_size, 80);
}
