//! The effective configuration, key by key, with the source of each value.

use std::fmt;

use figment::value::Value;
use serde::Serialize;
use serde::ser::{SerializeStruct, Serializer};

use super::layer::{leaves, render};
use crate::problem::Source;
use crate::settings::DatabaseConfig;

/// The order of the sections in the explained view.
const SECTIONS: [&str; 14] = [
    "environment",
    "primary",
    "replicas",
    "pool",
    "tls",
    "keepalive",
    "query",
    "retry",
    "circuit_breaker",
    "health",
    "migrations",
    "startup",
    "features",
    "telemetry",
];

/// One effective key: its value (redacted when secret) and where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    key: String,
    text: String,
    value: Value,
    source: Source,
}

impl Entry {
    /// The key, as `section.key` (`pool.max_size`, `replicas[0]`).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The value as text; a password shows as [`REDACTED`](crate::REDACTED).
    pub fn value(&self) -> &str {
        &self.text
    }

    /// Where the value came from.
    pub fn source(&self) -> &Source {
        &self.source
    }
}

impl Serialize for Entry {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("Entry", 3)?;
        s.serialize_field("key", &self.key)?;
        s.serialize_field("value", &self.value)?;
        s.serialize_field("source", &self.source)?;
        s.end()
    }
}

/// A loaded configuration together with the source of every value: what
/// `cargo xtask config` prints.
///
/// `Display` renders a table of key, value and source; `Serialize` gives
/// `{"environment": …, "entries": [{"key", "value", "source"}, …]}`.
/// Passwords are redacted in both.
#[derive(Clone, Debug, PartialEq)]
pub struct Explained {
    config: DatabaseConfig,
    entries: Vec<Entry>,
}

impl Explained {
    /// Builds the view of `config`; `source_of` names the source of a key.
    pub(super) fn new(config: DatabaseConfig, source_of: &dyn Fn(&str) -> Source) -> Self {
        let mut entries = Vec::new();
        // Serializing redacts the password.
        let tree = match Value::serialize(&config) {
            Ok(Value::Dict(_, dict)) => dict,
            _ => Default::default(),
        };
        let mut flat = Vec::new();
        leaves(&tree, "", &mut flat);
        for (key, value) in flat {
            if key == "replicas" {
                if config.replicas.is_empty() {
                    entries.push(Entry {
                        key: key.clone(),
                        text: "[]".to_owned(),
                        value: value.clone(),
                        source: source_of(&key),
                    });
                }
                for (i, replica) in config.replicas.iter().enumerate() {
                    let key = format!("replicas[{i}]");
                    let text = replica.redacted_url();
                    entries.push(Entry {
                        source: source_of(&key),
                        value: Value::from(text.clone()),
                        text,
                        key,
                    });
                }
                continue;
            }
            entries.push(Entry {
                text: render(&key, value),
                value: value.clone(),
                source: source_of(&key),
                key,
            });
        }
        let rank = |key: &str| {
            let section = key.split(['.', '[']).next().unwrap_or(key);
            SECTIONS
                .iter()
                .position(|s| *s == section)
                .unwrap_or(SECTIONS.len())
        };
        entries.sort_by(|a, b| {
            rank(&a.key)
                .cmp(&rank(&b.key))
                .then_with(|| a.key.cmp(&b.key))
        });
        Explained { config, entries }
    }

    /// The configuration.
    pub fn config(&self) -> &DatabaseConfig {
        &self.config
    }

    /// The configuration, by value.
    pub fn into_config(self) -> DatabaseConfig {
        self.config
    }

    /// Every key, in section order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The entry of `key`, if there is one.
    pub fn entry(&self, key: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.key == key)
    }
}

impl fmt::Display for Explained {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let key_width = self
            .entries
            .iter()
            .map(|e| e.key.len())
            .max()
            .unwrap_or(3)
            .max(3);
        let value_width = self
            .entries
            .iter()
            .map(|e| e.text.chars().count())
            .max()
            .unwrap_or(5)
            .clamp(5, 60);
        writeln!(f, "{:key_width$}  {:value_width$}  SOURCE", "KEY", "VALUE")?;
        for entry in &self.entries {
            writeln!(
                f,
                "{:key_width$}  {:value_width$}  {}",
                entry.key, entry.text, entry.source
            )?;
        }
        Ok(())
    }
}

impl Serialize for Explained {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("Explained", 2)?;
        s.serialize_field("environment", &self.config.environment)?;
        s.serialize_field("entries", &self.entries)?;
        s.end()
    }
}
