//! A password never appears in Debug, Display, errors, logs or any
//! serialized output.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{fails, load_env, load_file, toml};
use pgstack_config::{ConfigLoader, Explained, NodeSettings, Password, REDACTED};

const SECRET: &str = "hunter2-Zq9";

fn url(host: &str) -> String {
    format!("postgres://app:{SECRET}@{host}:5432/bills")
}

fn loaded() -> Explained {
    load_env(&[
        ("DATABASE_URL", &url("db.internal")),
        ("DATABASE_REPLICA_URLS", &url("r1.internal")),
    ])
    .unwrap()
}

#[track_caller]
fn assert_hidden(text: &str) {
    assert!(!text.contains(SECRET), "the password leaked into:\n{text}");
}

#[test]
fn password_debug_display_and_serialize() {
    let password = Password::new(SECRET);
    assert_eq!(format!("{password}"), REDACTED);
    assert_hidden(&format!("{password:?}"));
    assert_hidden(&format!("{password:#?}"));
    assert_eq!(
        serde_json::to_string(&password).unwrap(),
        format!("\"{REDACTED}\"")
    );
    assert_eq!(password.expose(), SECRET);
}

#[test]
fn node_debug_and_display() {
    let node = NodeSettings::from_url(&url("db.internal")).unwrap();
    assert_hidden(&format!("{node:?}"));
    assert_eq!(
        node.to_string(),
        format!("postgres://app:{REDACTED}@db.internal:5432/bills")
    );
    assert_hidden(&serde_json::to_string(&node).unwrap());
}

#[test]
fn config_debug_and_serialized() {
    let explained = loaded();
    let config = explained.config();
    assert_eq!(config.primary.password.as_ref().unwrap().expose(), SECRET);
    assert_eq!(
        config.replicas[0].password.as_ref().unwrap().expose(),
        SECRET
    );
    assert_hidden(&format!("{config:?}"));
    assert_hidden(&format!("{config:#?}"));
    assert_hidden(&serde_json::to_string(config).unwrap());
}

#[test]
fn explained_view_table_and_json() {
    let explained = loaded();
    let table = explained.to_string();
    assert_hidden(&table);
    assert!(table.contains(REDACTED), "{table}");
    assert_eq!(
        explained.entry("primary.password").unwrap().value(),
        REDACTED
    );
    assert_hidden(&format!("{explained:?}"));
    let json = serde_json::to_string(&explained).unwrap();
    assert_hidden(&json);
    assert!(
        json.contains("\"key\":\"primary.password\",\"value\":\"********\""),
        "{json}"
    );
}

#[test]
fn errors_about_a_bad_database_url_do_not_echo_it() {
    for bad in [
        format!("postgres://app:{SECRET}@db.internal:notaport/bills"),
        format!("postgres://app:{SECRET}@/bills"),
        format!("mysql://app:{SECRET}@db.internal/bills"),
        format!("postgres://app:{SECRET}"),
        format!("app:{SECRET}@db.internal/bills"),
    ] {
        let error = fails(load_env(&[("DATABASE_URL", &bad)]));
        assert_eq!(error.problems()[0].key, "primary", "{error}");
        assert_hidden(&error.to_string());
        assert_hidden(&format!("{error:?}"));
    }
    let error = fails(load_env(&[(
        "DATABASE_REPLICA_URLS",
        &format!("postgres://r:{SECRET}@:1/x"),
    )]));
    assert_hidden(&error.to_string());
}

#[test]
fn errors_about_other_keys_do_not_show_a_valid_password() {
    // The replica points at the primary: the message shows the node, redacted.
    let error = fails(load_env(&[
        ("DATABASE_URL", &url("db.internal")),
        ("DATABASE_REPLICA_URLS", &url("db.internal")),
    ]));
    let text = error.to_string();
    assert!(
        text.contains(&format!("app:{REDACTED}@db.internal")),
        "{text}"
    );
    assert_hidden(&text);
    assert_hidden(&format!("{error:?}"));
}

#[test]
fn errors_about_a_password_of_the_wrong_type_do_not_show_it() {
    let file = toml("[default]\nprimary.password = 31337\nprimary.url = 42\n");
    let error = fails(load_file(&file, &[]));
    let text = format!("{error} {error:?}");
    assert!(!text.contains("31337"), "{text}");
    assert!(text.contains("primary.password"), "{text}");

    let file = toml(&format!(
        "[default]\nprimary = \"postgres://app:{SECRET}@:1/x\"\n"
    ));
    let error = fails(load_file(&file, &[]));
    assert_hidden(&format!("{error} {error:?}"));
}

#[test]
fn the_loader_debug_does_not_show_injected_values() {
    let loader = ConfigLoader::new().env_source([("DB_PASSWORD", SECRET)]);
    let text = format!("{loader:?}");
    assert!(text.contains("DB_PASSWORD"), "{text}");
    assert_hidden(&text);
}
