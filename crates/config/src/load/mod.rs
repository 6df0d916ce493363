//! Layered loading (feature `load`): built-in defaults → the environment's
//! profile → `pgstack.toml` → environment variables → overrides in code.

mod explain;
mod file;
mod layer;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use figment::Figment;
use figment::error::Kind;
use figment::value::{Dict, Value};
use serde::Serialize;

pub use self::explain::{Entry, Explained};
use self::file::ConfigFile;
use self::layer::{
    AUTOMATIC_KEYS, Layer, LayerProvider, OPTIONAL_KEYS, Origin, closest, get_path, is_secret_key,
    leaves, merge, normalize, parent, remove_path, render, set_path,
};
use crate::environment::Environment;
use crate::problem::{ConfigError, Problem, Source};
use crate::settings::{DatabaseConfig, Profile};
use crate::validate::check;

/// The configuration file read when none is named: `pgstack.toml` in the
/// current directory. It may be absent.
pub const DEFAULT_FILE: &str = "pgstack.toml";

/// The environment variable naming the configuration file (which must then exist).
pub const CONFIG_FILE_VAR: &str = "PGSTACK_CONFIG";

/// The environment variables naming the environment; the first one set wins.
pub const ENVIRONMENT_VARS: [&str; 2] = ["PGSTACK_ENV", "APP_ENV"];

/// The prefix of `PGSTACK_<SECTION>__<KEY>` variables.
pub const ENV_PREFIX: &str = "PGSTACK_";

/// The conventional connection variables and the key each one sets, in the
/// order they are applied (later wins). `DATABASE_URL` comes before all of
/// them and sets the whole primary; `DATABASE_REPLICA_URLS` sets `replicas`.
pub const CONNECTION_VARS: [(&str, &str); 6] = [
    ("DB_HOST", "primary.host"),
    ("DB_PORT", "primary.port"),
    ("DB_NAME", "primary.database"),
    ("DB_USER", "primary.user"),
    ("DB_PASSWORD", "primary.password"),
    ("DB_SSLMODE", "tls.mode"),
];

/// The keys a profile sets.
const PROFILE_KEYS: [&str; 5] = [
    "pool.min_idle",
    "pool.max_size",
    "tls.mode",
    "migrations.auto_migrate",
    "health.interval",
];

const DATABASE_URL: &str = "DATABASE_URL";
const DATABASE_REPLICA_URLS: &str = "DATABASE_REPLICA_URLS";

enum FileChoice {
    /// `PGSTACK_CONFIG` if set (must exist), else `pgstack.toml` if present.
    Auto,
    /// This file, which must exist.
    Explicit(PathBuf),
    /// No file.
    Disabled,
}

type Edit = Box<dyn FnOnce(&mut DatabaseConfig) + Send>;

/// Loads a [`DatabaseConfig`] from its layered sources, later wins:
///
/// 1. built-in defaults;
/// 2. the profile of the environment (`APP_ENV` / `PGSTACK_ENV`, or
///    [`ConfigLoader::environment`]);
/// 3. the configuration file (`pgstack.toml`, or `PGSTACK_CONFIG`, or
///    [`ConfigLoader::file`]): its `[default]` table, then the table of the
///    environment (`[production]`, …);
/// 4. environment variables: `DATABASE_URL`, `DATABASE_REPLICA_URLS`, then
///    `DB_HOST`, `DB_PORT`, `DB_NAME`, `DB_USER`, `DB_PASSWORD`, `DB_SSLMODE`,
///    then `PGSTACK_<SECTION>__<KEY>`;
/// 5. overrides in code: [`ConfigLoader::set`], then [`ConfigLoader::with`].
///
/// Loading validates the result and reports every problem at once, each
/// with its key, value and source.
///
/// ```
/// use pgstack_config::{ConfigLoader, Environment};
///
/// let config = ConfigLoader::new()
///     .without_file()
///     .env_source([("DATABASE_URL", "postgres://app:secret@db.internal:5432/bills")])
///     .environment(Environment::Staging)
///     .set("pool.max_size", 20)
///     .load()?;
/// assert_eq!(config.primary.host, "db.internal");
/// assert_eq!(config.pool.max_size, 20);
/// assert_eq!(config.pool.min_idle, 3); // the staging profile
/// # Ok::<(), pgstack_config::ConfigError>(())
/// ```
pub struct ConfigLoader {
    file: FileChoice,
    env: Option<BTreeMap<String, String>>,
    environment: Option<Environment>,
    sets: Vec<(String, Result<Value, String>)>,
    edits: Vec<Edit>,
}

impl fmt::Debug for ConfigLoader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = match &self.file {
            FileChoice::Auto => "auto".to_owned(),
            FileChoice::Explicit(path) => path.display().to_string(),
            FileChoice::Disabled => "none".to_owned(),
        };
        // The environment may hold secrets: show only the names.
        let env = self.env.as_ref().map(|map| map.keys().collect::<Vec<_>>());
        let sets: Vec<&str> = self.sets.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("ConfigLoader")
            .field("file", &file)
            .field("env", &env)
            .field("environment", &self.environment)
            .field("sets", &sets)
            .field("edits", &self.edits.len())
            .finish()
    }
}

impl Default for ConfigLoader {
    fn default() -> Self {
        ConfigLoader::new()
    }
}

impl DatabaseConfig {
    /// Loads the configuration from the default sources (`pgstack.toml` or
    /// `PGSTACK_CONFIG`, and the process environment). Same as
    /// `ConfigLoader::new().load()`.
    ///
    /// # Errors
    /// A [`ConfigError`] listing every problem found.
    pub fn load() -> Result<Self, ConfigError> {
        ConfigLoader::new().load()
    }
}

impl ConfigLoader {
    /// A loader with the default sources: `pgstack.toml` in the current
    /// directory (or the file named by `PGSTACK_CONFIG`) and the process
    /// environment.
    pub fn new() -> Self {
        ConfigLoader {
            file: FileChoice::Auto,
            env: None,
            environment: None,
            sets: Vec::new(),
            edits: Vec::new(),
        }
    }

    /// Reads this configuration file instead of `pgstack.toml`; it must exist.
    pub fn file(mut self, path: impl Into<PathBuf>) -> Self {
        self.file = FileChoice::Explicit(path.into());
        self
    }

    /// Reads no configuration file at all.
    pub fn without_file(mut self) -> Self {
        self.file = FileChoice::Disabled;
        self
    }

    /// Takes environment variables from `vars` instead of the process
    /// environment (which is then not read at all). Tests use this, since
    /// changing the process environment races with other threads.
    pub fn env_source<K, V>(mut self, vars: impl IntoIterator<Item = (K, V)>) -> Self
    where
        K: Into<String>,
        V: Into<String>,
    {
        self.env = Some(
            vars.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        );
        self
    }

    /// Chooses the environment, over `APP_ENV`, `PGSTACK_ENV` and the file.
    pub fn environment(mut self, environment: Environment) -> Self {
        self.environment = Some(environment);
        self
    }

    /// Sets one key (`"pool.max_size"`, `"retry.initial_backoff"`) over every
    /// other source. Durations are written as text: `.set("retry.deadline", "10s")`.
    pub fn set(mut self, key: &str, value: impl Serialize) -> Self {
        let value = Value::serialize(value).map_err(|e| e.kind.to_string());
        self.sets.push((key.to_owned(), value));
        self
    }

    /// Changes the loaded configuration in code, after every other source and
    /// before validation. Keys it changes are reported with the source `code`.
    pub fn with(mut self, edit: impl FnOnce(&mut DatabaseConfig) + Send + 'static) -> Self {
        self.edits.push(Box::new(edit));
        self
    }

    /// Loads and validates the configuration.
    ///
    /// # Errors
    /// A [`ConfigError`] listing every problem found.
    pub fn load(self) -> Result<DatabaseConfig, ConfigError> {
        self.load_explained().map(Explained::into_config)
    }

    /// Loads and validates the configuration, keeping the source of every value.
    ///
    /// # Errors
    /// A [`ConfigError`] listing every problem found.
    pub fn load_explained(self) -> Result<Explained, ConfigError> {
        let ConfigLoader {
            file,
            env,
            environment,
            sets,
            edits,
        } = self;
        let env: BTreeMap<String, String> = match env {
            Some(map) => map,
            None => std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
                .collect(),
        };
        let mut problems = Vec::new();

        // The file.
        let file = match file {
            FileChoice::Disabled => None,
            FileChoice::Explicit(path) => {
                ConfigFile::read(&path, Some(Source::Code), &mut problems)
            }
            FileChoice::Auto => match var(&env, CONFIG_FILE_VAR) {
                Some(path) => ConfigFile::read(
                    Path::new(path),
                    Some(Source::Env(CONFIG_FILE_VAR.to_owned())),
                    &mut problems,
                ),
                None => ConfigFile::read(Path::new(DEFAULT_FILE), None, &mut problems),
            },
        }
        .map(Rc::new);

        // The environment, which selects the profile and the file's table.
        let (environment, environment_source) =
            resolve_environment(environment, &sets, &env, file.as_deref(), &mut problems);
        // Keys whose loaded value stands in for a bad one (see the rules below).
        let mut suspect: BTreeSet<String> = BTreeSet::new();
        if problems.iter().any(|p| p.key == "environment") {
            // An unknown environment fell back to development's profile.
            suspect.extend(PROFILE_KEYS.iter().map(|k| (*k).to_owned()));
        }
        if let Some(file) = &file {
            file.misplaced_environment(&mut problems);
        }

        // The layers, lowest first.
        let mut layers = vec![
            Layer {
                origin: Origin::Fixed(Source::Default),
                dict: defaults(),
            },
            Layer {
                origin: Origin::Fixed(Source::Profile(environment)),
                dict: profile(environment),
            },
        ];
        if let Some(file) = &file {
            for table in ["default", environment.as_str()] {
                if let Some(mut dict) = file.table(table) {
                    dict.remove("environment");
                    layers.push(Layer {
                        origin: Origin::File {
                            file: Rc::clone(file),
                            table: table.to_owned(),
                        },
                        dict,
                    });
                }
            }
        }
        layers.extend(env_layers(&env, &mut problems));
        for (key, value) in sets {
            if key == "environment" {
                continue;
            }
            match value {
                Ok(value) => {
                    let mut dict = Dict::new();
                    set_path(&mut dict, &key, value);
                    layers.push(Layer { origin: Origin::Fixed(Source::Code), dict });
                }
                Err(reason) => problems.push(Problem::new(
                    key,
                    None,
                    Source::Code,
                    format!("cannot be set from this value ({reason}); write durations as text like \"5s\""),
                )),
            }
        }
        let mut chosen = Dict::new();
        chosen.insert("environment".to_owned(), Value::from(environment.as_str()));
        layers.push(Layer {
            origin: Origin::Fixed(environment_source),
            dict: chosen,
        });

        let before_normalizing = problems.len();
        for layer in &mut layers {
            normalize(layer, &mut problems);
        }
        // A dropped node part or URL leaves a lower layer's value in its place.
        suspect.extend(problems[before_normalizing..].iter().map(|p| p.key.clone()));
        let mut sources = Sources::from_layers(&layers);

        // Extraction: on failure, find every bad key by extracting each one
        // alone, then load what remains so the rules can still run.
        let mut failed = BTreeSet::new();
        let config = match extract(&layers) {
            Ok(config) => Some(config),
            Err(error) => {
                let mut merged = Dict::new();
                for layer in &layers {
                    merge(&mut merged, &layer.dict);
                }
                let before = problems.len();
                isolate(&merged, &sources, &mut problems, &mut failed);
                if problems.len() == before {
                    for e in *error {
                        problems.push(problem_from(e, "", None, &sources));
                    }
                }
                for layer in &mut layers {
                    for key in &failed {
                        remove_path(&mut layer.dict, key);
                    }
                }
                extract(&layers).ok()
            }
        };

        let Some(mut config) = config else {
            return Err(invalid(problems));
        };
        let before = config.clone();
        for edit in edits {
            edit(&mut config);
        }
        sources.mark_edits(&before, &config);

        // A bad value was replaced by a lower layer's to load the rest, so a
        // rule about it (or comparing another key with it) would mislead.
        let source_of = |key: &str| sources.of(key);
        suspect.extend(failed.iter().cloned());
        let primary_suspect = suspect.iter().any(|k| section(k) == "primary");
        let misleading = |p: &Problem| {
            suspect
                .iter()
                .any(|f| p.key == *f || p.message.contains(f.as_str()))
                || (primary_suspect && section(&p.key) == "primary")
        };
        problems.extend(
            check(&config, &source_of)
                .into_iter()
                .filter(|p| !misleading(p)),
        );
        if !problems.is_empty() {
            return Err(invalid(problems));
        }
        tracing::debug!(
            environment = %config.environment,
            primary = %config.primary,
            replicas = config.replicas.len(),
            config = ?config,
            "configuration loaded"
        );
        Ok(Explained::new(config, &source_of))
    }
}

fn invalid(problems: Vec<Problem>) -> ConfigError {
    tracing::debug!(problems = problems.len(), "configuration invalid");
    ConfigError::new(problems)
}

/// The first segment of a key; primary and replicas count as one section.
fn section(key: &str) -> &str {
    let first = key.split(['.', '[']).next().unwrap_or(key);
    if first == "replicas" {
        "primary"
    } else {
        first
    }
}

/// A variable's value, trimmed; `None` when unset or blank.
fn var<'a>(env: &'a BTreeMap<String, String>, name: &str) -> Option<&'a str> {
    env.get(name).map(|v| v.trim()).filter(|v| !v.is_empty())
}

fn extract(layers: &[Layer]) -> Result<DatabaseConfig, Box<figment::Error>> {
    let figment = layers
        .iter()
        .enumerate()
        .fold(Figment::new(), |figment, (i, layer)| {
            let name = match &layer.origin {
                Origin::Fixed(source) => format!("{i}: {source}"),
                Origin::File { file, table } => format!("{i}: {} [{table}]", file.path.display()),
            };
            figment.merge(LayerProvider {
                name,
                dict: layer.dict.clone(),
            })
        });
    figment.extract_lossy().map_err(Box::new)
}

/// Which layer set each key last.
struct Sources {
    by_key: BTreeMap<String, (usize, Source)>,
}

impl Sources {
    fn from_layers(layers: &[Layer]) -> Self {
        let mut by_key = BTreeMap::new();
        for (i, layer) in layers.iter().enumerate() {
            let mut flat = Vec::new();
            leaves(&layer.dict, "", &mut flat);
            for (key, _) in flat {
                let source = layer.origin.source_for(&key);
                by_key.insert(key, (i, source));
            }
        }
        Sources { by_key }
    }

    /// The source of `key`: its own, else its nearest ancestor's, else that
    /// of the latest layer that set anything under it.
    fn of(&self, key: &str) -> Source {
        let normalized = key.replace('[', ".").replace(']', "");
        let mut current = normalized.as_str();
        loop {
            if let Some((_, source)) = self.by_key.get(current) {
                return source.clone();
            }
            match parent(current) {
                Some(up) => current = up,
                None => break,
            }
        }
        let prefix = format!("{normalized}.");
        self.by_key
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .max_by_key(|(_, (layer, _))| *layer)
            .map_or(Source::Default, |(_, (_, source))| source.clone())
    }

    /// Records every key that `with` edits changed as set in code.
    fn mark_edits(&mut self, before: &DatabaseConfig, after: &DatabaseConfig) {
        let flat = |config: &DatabaseConfig| -> BTreeMap<String, Value> {
            let mut out = Vec::new();
            let tree = match Value::serialize(config) {
                Ok(Value::Dict(_, dict)) => dict,
                _ => Dict::new(),
            };
            leaves(&tree, "", &mut out);
            out.into_iter().map(|(k, v)| (k, v.clone())).collect()
        };
        let (old, new) = (flat(before), flat(after));
        for (key, value) in &new {
            if old.get(key) != Some(value) {
                self.by_key.insert(key.clone(), (usize::MAX, Source::Code));
            }
        }
        // Serializing redacts passwords, so compare them directly.
        if before.primary.password != after.primary.password {
            self.by_key
                .insert("primary.password".to_owned(), (usize::MAX, Source::Code));
        }
        if before.replicas != after.replicas {
            self.by_key
                .insert("replicas".to_owned(), (usize::MAX, Source::Code));
        }
    }
}

/// Every key at its default value (the environment is set by its own layer).
fn defaults() -> Dict {
    match Value::serialize(DatabaseConfig::default()) {
        Ok(Value::Dict(_, mut dict)) => {
            dict.remove("environment");
            dict
        }
        _ => Dict::new(),
    }
}

/// The keys an environment's profile sets.
fn profile(environment: Environment) -> Dict {
    let p = Profile::of(environment);
    let mut dict = Dict::new();
    set_path(&mut dict, "pool.min_idle", Value::from(p.min_idle));
    set_path(&mut dict, "pool.max_size", Value::from(p.max_size));
    set_path(&mut dict, "tls.mode", Value::from(p.tls_mode.as_str()));
    set_path(
        &mut dict,
        "migrations.auto_migrate",
        Value::from(p.auto_migrate),
    );
    let interval = humantime::format_duration(p.health_interval).to_string();
    set_path(&mut dict, "health.interval", Value::from(interval));
    set_path(&mut dict, "telemetry.query_text", Value::from(p.query_text));
    dict
}

/// The environment, and where it was chosen: code, then the `environment`
/// key set in code, then `PGSTACK_ENV`, `APP_ENV`, the file's `[default]`,
/// and last the default (development).
fn resolve_environment(
    code: Option<Environment>,
    sets: &[(String, Result<Value, String>)],
    env: &BTreeMap<String, String>,
    file: Option<&ConfigFile>,
    problems: &mut Vec<Problem>,
) -> (Environment, Source) {
    if let Some(environment) = code {
        return (environment, Source::Code);
    }
    let from_set = sets
        .iter()
        .rev()
        .find(|(k, _)| k == "environment")
        .map(|(_, v)| {
            let name = match v {
                Ok(Value::String(_, s)) => s.clone(),
                Ok(other) => render("environment", other),
                Err(e) => e.clone(),
            };
            (name, Source::Code)
        });
    let from_env = || {
        ENVIRONMENT_VARS.iter().find_map(|name| {
            var(env, name).map(|v| (v.to_owned(), Source::Env((*name).to_owned())))
        })
    };
    let Some((name, source)) = from_set
        .or_else(from_env)
        .or_else(|| file.and_then(ConfigFile::environment))
    else {
        return (Environment::default(), Source::Default);
    };
    match name.parse::<Environment>() {
        Ok(environment) => (environment, source),
        Err(_) => {
            let lower = name.trim().to_ascii_lowercase();
            let names = Environment::ALL.map(Environment::as_str);
            let guess = names
                .iter()
                .find(|n| !lower.is_empty() && n.starts_with(&lower))
                .copied()
                .or_else(|| closest(&lower, names));
            let hint = guess
                .map(|g| format!("did you mean {g}? "))
                .unwrap_or_default();
            problems.push(Problem::new(
                "environment",
                Some(name.clone()),
                source.clone(),
                format!("unknown environment; {hint}expected one of development, test, staging, production"),
            ));
            (Environment::default(), source)
        }
    }
}

/// One layer per environment variable, in the order they apply.
fn env_layers(env: &BTreeMap<String, String>, problems: &mut Vec<Problem>) -> Vec<Layer> {
    let mut layers = Vec::new();
    let mut push = |name: &str, dict: Dict| {
        layers.push(Layer {
            origin: Origin::Fixed(Source::Env(name.to_owned())),
            dict,
        });
    };
    if let Some(url) = var(env, DATABASE_URL) {
        let mut dict = Dict::new();
        dict.insert("primary".to_owned(), Value::from(url.to_owned()));
        push(DATABASE_URL, dict);
    }
    if let Some(list) = var(env, DATABASE_REPLICA_URLS) {
        let urls: Vec<Value> = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| Value::from(s.to_owned()))
            .collect();
        let mut dict = Dict::new();
        dict.insert("replicas".to_owned(), Value::from(urls));
        push(DATABASE_REPLICA_URLS, dict);
    }
    for (name, key) in CONNECTION_VARS {
        // A password is taken as it is; anything else is trimmed.
        let value = if name == "DB_PASSWORD" {
            env.get(name).filter(|v| !v.is_empty()).cloned()
        } else {
            var(env, name).map(str::to_owned)
        };
        if let Some(value) = value {
            let mut dict = Dict::new();
            set_path(&mut dict, key, Value::from(value));
            push(name, dict);
        }
    }
    for (name, value) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if !rest.contains("__") {
            continue; // PGSTACK_ENV, PGSTACK_CONFIG, and other tools' variables
        }
        let parts: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
        if parts.iter().any(String::is_empty) {
            problems.push(Problem::new(
                name.clone(),
                None,
                Source::Env(name.clone()),
                "is not a configuration key: write PGSTACK_<SECTION>__<KEY>, e.g. PGSTACK_POOL__MAX_SIZE",
            ));
            continue;
        }
        let mut dict = Dict::new();
        set_path(&mut dict, &parts.join("."), Value::from(value.clone()));
        push(name, dict);
    }
    layers
}

/// Extracts each key of `merged` alone to find every bad one; records a
/// problem per bad key and the keys in `failed`.
fn isolate(
    merged: &Dict,
    sources: &Sources,
    problems: &mut Vec<Problem>,
    failed: &mut BTreeSet<String>,
) {
    let mut flat = Vec::new();
    leaves(merged, "", &mut flat);
    let mut seen = BTreeSet::new();
    for (key, value) in flat {
        let mut single = Dict::new();
        set_path(&mut single, &key, value.clone());
        let figment = Figment::from(LayerProvider {
            name: key.clone(),
            dict: single,
        });
        if let Err(error) = figment.extract_lossy::<DatabaseConfig>() {
            failed.insert(key.clone());
            for e in error {
                let problem = problem_from(e, &key, Some(value), sources);
                if seen.insert((problem.key.clone(), problem.message.clone())) {
                    problems.push(problem);
                }
            }
        }
    }
}

/// Whether `key` holds a duration, judging by its default.
fn is_duration_key(key: &str) -> bool {
    if OPTIONAL_KEYS.contains(&key) {
        return key != "tls.root_cert";
    }
    matches!(get_path(&defaults(), key), Some(Value::String(_, s)) if humantime::parse_duration(s).is_ok())
}

/// A figment error as a problem. `leaf` is the key that was being extracted
/// and `value` its value, when known.
fn problem_from(
    error: figment::Error,
    leaf: &str,
    value: Option<&Value>,
    sources: &Sources,
) -> Problem {
    let path = error.path.join(".");
    let join = |a: &str, b: &str| {
        if a.is_empty() {
            b.to_owned()
        } else {
            format!("{a}.{b}")
        }
    };
    let (key, message) = match &error.kind {
        Kind::UnknownField(field, expected) => {
            // figment's path may already end with the unknown field.
            let path = match error.path.split_last() {
                Some((last, init)) if last == field => init.join("."),
                _ => path.clone(),
            };
            let key = join(&path, field);
            let hint = closest(field, expected.iter().copied())
                .map(|best| format!("did you mean {}? ", join(&path, best)))
                .unwrap_or_default();
            let place = if path.is_empty() {
                String::new()
            } else {
                format!(" in {path}")
            };
            (
                key,
                format!(
                    "unknown key; {hint}valid keys{place}: {}",
                    expected.join(", ")
                ),
            )
        }
        kind => {
            let key = if path.is_empty() {
                leaf.to_owned()
            } else {
                path.clone()
            };
            let mut message = if is_secret_key(&key) {
                "has the wrong type (the value is not shown: it is secret)".to_owned()
            } else {
                describe(kind)
            };
            if is_duration_key(&key) {
                message.push_str("; write durations like \"250ms\", \"5s\" or \"10m\"");
            }
            if AUTOMATIC_KEYS.contains(&key.as_str()) {
                message.push_str(", or \"auto\" (or leave it out) to have it chosen");
            }
            (key, message)
        }
    };
    let shown = value.filter(|_| key == leaf).map(|v| render(&key, v));
    let source = sources.of(&key);
    Problem::new(key, shown, source, message)
}

fn describe(kind: &Kind) -> String {
    match kind {
        Kind::Message(message) => message.clone(),
        Kind::InvalidType(actual, expected) | Kind::InvalidValue(actual, expected) => {
            let expected = match expected.as_str() {
                "u8" | "u16" | "u32" | "u64" | "usize" => "a whole number (0 or more)",
                "f32" | "f64" => "a number",
                "a boolean" | "bool" => "true or false",
                other => other,
            };
            format!("expected {expected}, found {actual}")
        }
        Kind::UnknownVariant(given, expected) => {
            let hint = closest(given, expected.iter().copied())
                .map(|best| format!("did you mean {best}? "))
                .unwrap_or_default();
            format!(
                "unknown value `{given}`; {hint}expected one of {}",
                expected.join(", ")
            )
        }
        other => other.to_string(),
    }
}
