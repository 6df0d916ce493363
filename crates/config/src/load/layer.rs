//! One source of values (a layer), its normalization, and helpers over
//! figment's value trees.

use std::rc::Rc;

use figment::value::{Dict, Empty, Map, Value};
use figment::{Metadata, Profile, Provider};

use super::file::ConfigFile;
use crate::problem::{Problem, Source};
use crate::secret::REDACTED;
use crate::settings::NodeSettings;

/// Where the values of one layer came from.
pub(super) enum Origin {
    /// Every value of the layer has this source.
    Fixed(Source),
    /// A table of a configuration file: each key has its own line.
    File { file: Rc<ConfigFile>, table: String },
}

impl Origin {
    /// The source of `key`, with the file line when the layer is a file.
    pub(super) fn source_for(&self, key: &str) -> Source {
        match self {
            Origin::Fixed(source) => source.clone(),
            Origin::File { file, table } => Source::File {
                path: file.path.clone(),
                line: file.line_of(table, key),
            },
        }
    }
}

/// One layer: its origin and the values it sets.
pub(super) struct Layer {
    pub(super) origin: Origin,
    pub(super) dict: Dict,
}

/// A layer handed to figment, with a unique name so figment's metadata
/// stays distinct per layer.
pub(super) struct LayerProvider {
    pub(super) name: String,
    pub(super) dict: Dict,
}

impl Provider for LayerProvider {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.name.clone())
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut map = Map::new();
        map.insert(Profile::Default, self.dict.clone());
        Ok(map)
    }
}

/// Keys whose value may be "none" (or "off"): optional durations and paths.
pub(super) const OPTIONAL_KEYS: [&str; 6] = [
    "pool.idle_timeout",
    "pool.max_lifetime",
    "pool.leak_detection_threshold",
    "query.statement_timeout",
    "retry.deadline",
    "tls.root_cert",
];

/// Keys whose absence means "chosen automatically": shown as `auto`, and
/// `auto` may be written for them.
pub(super) const AUTOMATIC_KEYS: [&str; 1] = ["query.shared_connections"];

/// The keys of a node table.
pub(super) const NODE_KEYS: [&str; 6] = ["url", "host", "port", "database", "user", "password"];

/// Splits `a.b[2].c` into `["a", "b", "2", "c"]`.
pub(super) fn segments(key: &str) -> Vec<String> {
    key.split('.')
        .flat_map(|part| part.split(['[', ']']))
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The key one level up: `replicas[1]` → `replicas`, `pool.max_size` → `pool`.
pub(super) fn parent(key: &str) -> Option<&str> {
    if let Some(stripped) = key.strip_suffix(']') {
        return stripped.rfind('[').map(|i| &key[..i]);
    }
    key.rfind('.').map(|i| &key[..i])
}

/// Sets `key` (dotted) in `dict`, creating tables on the way.
pub(super) fn set_path(dict: &mut Dict, key: &str, value: Value) {
    let parts: Vec<&str> = key.split('.').collect();
    let Some((last, init)) = parts.split_last() else {
        return;
    };
    let mut current = dict;
    for part in init {
        let entry = current
            .entry((*part).to_owned())
            .or_insert_with(|| Value::Dict(Default::default(), Dict::new()));
        if !matches!(entry, Value::Dict(..)) {
            *entry = Value::Dict(Default::default(), Dict::new());
        }
        let Value::Dict(_, next) = entry else { return };
        current = next;
    }
    current.insert((*last).to_owned(), value);
}

/// The value at `key` (dotted), if any.
pub(super) fn get_path<'a>(dict: &'a Dict, key: &str) -> Option<&'a Value> {
    let mut parts = key.split('.');
    let mut value = dict.get(parts.next()?)?;
    for part in parts {
        match value {
            Value::Dict(_, inner) => value = inner.get(part)?,
            _ => return None,
        }
    }
    Some(value)
}

fn get_path_mut<'a>(dict: &'a mut Dict, key: &str) -> Option<&'a mut Value> {
    let mut parts = key.split('.');
    let mut value = dict.get_mut(parts.next()?)?;
    for part in parts {
        match value {
            Value::Dict(_, inner) => value = inner.get_mut(part)?,
            _ => return None,
        }
    }
    Some(value)
}

/// Removes `key` (dotted) from `dict`, and tables left empty by that.
pub(super) fn remove_path(dict: &mut Dict, key: &str) {
    match key.split_once('.') {
        None => {
            dict.remove(key);
        }
        Some((head, rest)) => {
            if let Some(Value::Dict(_, inner)) = dict.get_mut(head) {
                remove_path(inner, rest);
                if inner.is_empty() {
                    dict.remove(head);
                }
            }
        }
    }
}

/// Every leaf of `dict` as (`section.key`, value); arrays are leaves.
pub(super) fn leaves<'a>(dict: &'a Dict, prefix: &str, out: &mut Vec<(String, &'a Value)>) {
    for (key, value) in dict {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match value {
            Value::Dict(_, inner) if !inner.is_empty() => leaves(inner, &path, out),
            Value::Dict(..) => {}
            other => out.push((path, other)),
        }
    }
}

/// Merges `top` over `base` as figment's `merge` does: tables are joined key
/// by key, anything else is replaced.
pub(super) fn merge(base: &mut Dict, top: &Dict) {
    for (key, value) in top {
        match (base.get_mut(key), value) {
            (Some(Value::Dict(_, inner)), Value::Dict(_, top_inner)) => merge(inner, top_inner),
            _ => {
                base.insert(key.clone(), value.clone());
            }
        }
    }
}

/// Whether `key` holds a secret (a password, or a URL that may hold one).
pub(super) fn is_secret_key(key: &str) -> bool {
    let last = segments(key).pop().unwrap_or_default();
    last == "password" || last == "url"
}

/// `value` as text for messages and the explained view, redacted when `key`
/// is secret or the text looks like a URL with credentials.
pub(super) fn render(key: &str, value: &Value) -> String {
    if is_secret_key(key) && !matches!(value, Value::Empty(..)) {
        if key.ends_with("url")
            && let Value::String(_, text) = value
            && let Ok(node) = NodeSettings::from_url(text)
        {
            return node.redacted_url();
        }
        return REDACTED.to_owned();
    }
    match value {
        Value::String(_, text) => {
            if text.contains("://") && text.contains('@') {
                match NodeSettings::from_url(text) {
                    Ok(node) => node.redacted_url(),
                    Err(_) => REDACTED.to_owned(),
                }
            } else {
                text.clone()
            }
        }
        Value::Char(_, c) => c.to_string(),
        Value::Bool(_, b) => b.to_string(),
        Value::Num(..) => {
            if let Some(u) = value.to_u128() {
                u.to_string()
            } else if let Some(i) = value.to_i128() {
                i.to_string()
            } else if let Some(f) = value.to_f64() {
                f.to_string()
            } else {
                "?".to_owned()
            }
        }
        Value::Empty(..) if AUTOMATIC_KEYS.contains(&key) => "auto".to_owned(),
        Value::Empty(..) => "none".to_owned(),
        Value::Dict(_, dict) => {
            let inner: Vec<String> = dict
                .iter()
                .map(|(k, v)| format!("{k} = {}", render(&format!("{key}.{k}"), v)))
                .collect();
            format!("{{ {} }}", inner.join(", "))
        }
        Value::Array(_, items) => {
            let inner: Vec<String> = items
                .iter()
                .enumerate()
                .map(|(i, v)| render(&format!("{key}[{i}]"), v))
                .collect();
            format!("[{}]", inner.join(", "))
        }
    }
}

/// The closest of `candidates` to `given`, if it is close enough to be a typo.
pub(super) fn closest<'a>(
    given: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let given = given.to_ascii_lowercase();
    let candidates: Vec<&str> = candidates.into_iter().collect();
    // An abbreviation ("prod") is as likely as a typo.
    if given.len() >= 3
        && let Some(c) = candidates.iter().find(|c| c.starts_with(&given))
    {
        return Some(c);
    }
    candidates
        .into_iter()
        .map(|c| (strsim::levenshtein(&given, c), c))
        .filter(|(distance, c)| *distance <= (c.len() / 3).max(2))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, c)| c)
}

/// A node URL as a table of its parts, plus its `sslmode` parameter.
fn url_to_table(text: &str) -> Result<(Dict, Option<String>), crate::NodeUrlError> {
    let node = NodeSettings::from_url(text)?;
    let mut dict = Dict::new();
    dict.insert("host".into(), Value::from(node.host));
    dict.insert("port".into(), Value::from(node.port));
    dict.insert("database".into(), Value::from(node.database));
    dict.insert("user".into(), Value::from(node.user));
    let password = match &node.password {
        Some(p) => Value::from(p.expose().to_owned()),
        None => Value::from(Empty::None),
    };
    dict.insert("password".into(), password);
    let sslmode = url::Url::parse(text.trim()).ok().and_then(|url| {
        url.query_pairs()
            .find(|(k, _)| k == "sslmode")
            .map(|(_, v)| v.into_owned())
    });
    Ok((dict, sslmode))
}

/// Brings a layer to one shape: node URLs become tables of their parts
/// (so a URL in a later layer replaces every part of the node), ports become
/// numbers, `sslmode` spellings become `tls.mode` values, and "none" clears
/// an optional key. Problems found on the way are recorded and the bad
/// values dropped, so the rest still loads.
pub(super) fn normalize(layer: &mut Layer, problems: &mut Vec<Problem>) {
    let mut sslmode = None;
    if let Some(value) = layer.dict.remove("primary")
        && let Some(value) = normalize_node(value, "primary", &layer.origin, problems, &mut sslmode)
    {
        layer.dict.insert("primary".into(), value);
    }
    if let Some(value) = layer.dict.remove("replicas") {
        let tag = value.tag();
        let items = match value {
            Value::Array(_, items) => Some(items),
            Value::String(_, text) => Some(
                text.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| Value::from(s.to_owned()))
                    .collect(),
            ),
            other => {
                problems.push(Problem::new(
                    "replicas",
                    Some(render("replicas", &other)),
                    layer.origin.source_for("replicas"),
                    "must be a list of postgres:// URLs or node tables",
                ));
                None
            }
        };
        if let Some(items) = items {
            let mut kept = Vec::new();
            let mut ignored = None;
            for (i, item) in items.into_iter().enumerate() {
                let key = format!("replicas[{i}]");
                if let Some(v) = normalize_node(item, &key, &layer.origin, problems, &mut ignored) {
                    kept.push(v);
                }
            }
            layer
                .dict
                .insert("replicas".into(), Value::Array(tag, kept));
        }
    }
    if let Some(mode) = sslmode
        && get_path(&layer.dict, "tls.mode").is_none()
    {
        set_path(&mut layer.dict, "tls.mode", Value::from(mode));
    }
    if let Some(Value::String(_, mode)) = get_path_mut(&mut layer.dict, "tls.mode") {
        *mode = libpq_sslmode(mode);
    }
    for key in AUTOMATIC_KEYS {
        if let Some(value) = get_path_mut(&mut layer.dict, key)
            && matches!(value, Value::String(_, s) if s.trim().eq_ignore_ascii_case("auto"))
        {
            *value = Value::from(Empty::None);
        }
    }
    for key in OPTIONAL_KEYS {
        if let Some(value) = get_path_mut(&mut layer.dict, key) {
            let off = match value {
                Value::String(_, s) => {
                    matches!(s.trim().to_ascii_lowercase().as_str(), "" | "none" | "off")
                }
                Value::Bool(_, b) => !*b,
                _ => false,
            };
            if off {
                *value = Value::from(Empty::None);
            }
        }
    }
}

/// libpq's `sslmode` spellings as `tls.mode` values: case and `_` do not
/// matter, and `allow` (TLS only if the server insists) is taken as `prefer`.
fn libpq_sslmode(mode: &str) -> String {
    let mode = mode.trim().to_ascii_lowercase().replace('_', "-");
    if mode == "allow" {
        "prefer".to_owned()
    } else {
        mode
    }
}

fn normalize_node(
    value: Value,
    key: &str,
    origin: &Origin,
    problems: &mut Vec<Problem>,
    sslmode: &mut Option<String>,
) -> Option<Value> {
    let url_problem = |problems: &mut Vec<Problem>, key: &str, error: crate::NodeUrlError| {
        problems.push(Problem::new(
            key,
            None,
            origin.source_for(key),
            format!("is not a usable connection URL: {error} (the value is not shown: it may hold a password)"),
        ));
    };
    match value {
        Value::String(tag, text) => match url_to_table(&text) {
            Ok((table, mode)) => {
                *sslmode = mode;
                Some(Value::Dict(tag, table))
            }
            Err(error) => {
                url_problem(problems, key, error);
                None
            }
        },
        Value::Dict(tag, mut table) => {
            let mut out = Dict::new();
            let mut bad_url = false;
            if let Some(url) = table.remove("url") {
                let url_key = format!("{key}.url");
                match url {
                    Value::String(_, text) => match url_to_table(&text) {
                        Ok((parts, mode)) => {
                            out = parts;
                            *sslmode = mode;
                        }
                        Err(error) => {
                            url_problem(problems, &url_key, error);
                            bad_url = true;
                        }
                    },
                    _ => {
                        problems.push(Problem::new(
                            url_key.clone(),
                            Some(REDACTED.to_owned()),
                            origin.source_for(&url_key),
                            "must be a postgres://user:password@host:port/database string",
                        ));
                        bad_url = true;
                    }
                }
            }
            for (name, value) in table {
                let sub = format!("{key}.{name}");
                let source = || origin.source_for(&sub);
                match (name.as_str(), value) {
                    ("port", Value::Num(t, n)) => {
                        out.insert(name, Value::Num(t, n));
                    }
                    ("port", Value::String(t, text)) => match text.trim().parse::<u16>() {
                        Ok(port) => {
                            out.insert(name, Value::Num(t, port.into()));
                        }
                        Err(_) => problems.push(Problem::new(
                            sub.clone(),
                            Some(text.clone()),
                            source(),
                            "must be a TCP port, a whole number from 1 to 65535",
                        )),
                    },
                    ("port", other) => problems.push(Problem::new(
                        sub.clone(),
                        Some(render(&sub, &other)),
                        source(),
                        "must be a TCP port, a whole number from 1 to 65535",
                    )),
                    ("password", v @ (Value::String(..) | Value::Empty(..))) => {
                        out.insert(name, v);
                    }
                    ("password", _) => problems.push(Problem::new(
                        sub.clone(),
                        Some(REDACTED.to_owned()),
                        source(),
                        "must be a string (quote it in TOML)",
                    )),
                    ("host" | "database" | "user", v @ Value::String(..)) => {
                        out.insert(name, v);
                    }
                    ("host" | "database" | "user", other) => problems.push(Problem::new(
                        sub.clone(),
                        Some(render(&sub, &other)),
                        source(),
                        "must be a string",
                    )),
                    (unknown, other) => {
                        let hint = match closest(unknown, NODE_KEYS) {
                            Some(best) => format!("did you mean {key}.{best}? "),
                            None => String::new(),
                        };
                        problems.push(Problem::new(
                            sub.clone(),
                            Some(render(&sub, &other)),
                            source(),
                            format!("unknown key; {hint}a node has url, host, port, database, user and password"),
                        ));
                    }
                }
            }
            // Without its URL the node's other parts would mean another server.
            if bad_url {
                None
            } else {
                Some(Value::Dict(tag, out))
            }
        }
        other => {
            problems.push(Problem::new(
                key,
                Some(render(key, &other)),
                origin.source_for(key),
                "must be a postgres:// URL or a table of host, port, database, user and password",
            ));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_and_go_up() {
        assert_eq!(segments("replicas[2].host"), ["replicas", "2", "host"]);
        assert_eq!(parent("replicas[2]"), Some("replicas"));
        assert_eq!(parent("pool.max_size"), Some("pool"));
        assert_eq!(parent("pool"), None);
    }

    #[test]
    fn closest_takes_typos_and_abbreviations_but_not_strangers() {
        let keys = ["max_size", "min_idle", "acquire_timeout"];
        assert_eq!(closest("max_szie", keys), Some("max_size"));
        assert_eq!(closest("acq", keys), Some("acquire_timeout"));
        assert_eq!(closest("colour", keys), None);
    }

    #[test]
    fn sslmode_spellings() {
        assert_eq!(libpq_sslmode(" Verify_Full "), "verify-full");
        assert_eq!(libpq_sslmode("allow"), "prefer");
        assert_eq!(libpq_sslmode("bogus"), "bogus");
    }

    #[test]
    fn render_redacts_secrets() {
        let url = Value::from("postgres://u:pw@h/db".to_owned());
        assert_eq!(
            render("primary.password", &Value::from("pw".to_owned())),
            REDACTED
        );
        assert_eq!(
            render("primary.url", &url),
            "postgres://u:********@h:5432/db"
        );
        assert_eq!(
            render("replicas[0]", &url),
            "postgres://u:********@h:5432/db"
        );
        assert_eq!(
            render("x", &Value::from("postgres://u:pw@:bad".to_owned())),
            REDACTED
        );
        assert_eq!(
            render("primary.password", &Value::from(Empty::None)),
            "none"
        );
    }

    #[test]
    fn merge_joins_tables_and_replaces_the_rest() {
        let mut base = Dict::new();
        set_path(&mut base, "pool.max_size", Value::from(5));
        set_path(&mut base, "pool.min_idle", Value::from(1));
        set_path(
            &mut base,
            "replicas",
            Value::from(vec![Value::from("a".to_owned())]),
        );
        let mut top = Dict::new();
        set_path(&mut top, "pool.max_size", Value::from(9));
        set_path(&mut top, "replicas", Value::from(Vec::<Value>::new()));
        merge(&mut base, &top);
        assert!(matches!(get_path(&base, "pool.max_size"), Some(v) if v.to_i128() == Some(9)));
        assert!(matches!(get_path(&base, "pool.min_idle"), Some(v) if v.to_i128() == Some(1)));
        assert!(matches!(get_path(&base, "replicas"), Some(Value::Array(_, a)) if a.is_empty()));
        remove_path(&mut base, "pool.max_size");
        remove_path(&mut base, "pool.min_idle");
        assert!(!base.contains_key("pool"));
    }
}
