//! `pgstack.toml`: reading it, and finding the line of each key.

use std::path::{Path, PathBuf};

use figment::providers::{Format, Toml};
use figment::value::{Dict, Value};
use figment::{Profile, Provider};
use toml_edit::{Document, Item};

use super::layer::{closest, segments};
use crate::environment::Environment;
use crate::problem::{Problem, Source};

/// The tables a configuration file may have.
pub(super) const TABLES: [&str; 5] = ["default", "development", "test", "staging", "production"];

/// A parsed configuration file.
pub(super) struct ConfigFile {
    /// The file, as it was named.
    pub(super) path: PathBuf,
    /// The document with spans, for line numbers.
    doc: Document<String>,
    /// The tables by name (`default`, `production`, …).
    pub(super) tables: Dict,
}

/// Turns a byte offset into a 1-based line number.
fn line_at(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .map_or(1, |head| head.bytes().filter(|b| *b == b'\n').count() + 1)
}

impl ConfigFile {
    /// Reads and parses `path`. `None` with no problem when the file is
    /// optional and absent; `None` with a problem when it cannot be used.
    pub(super) fn read(
        path: &Path,
        required_by: Option<Source>,
        problems: &mut Vec<Problem>,
    ) -> Option<ConfigFile> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                if let Some(source) = required_by {
                    problems.push(Problem::new(
                        "config file",
                        Some(path.display().to_string()),
                        source,
                        "no such file; create it, or name an existing file",
                    ));
                }
                return None;
            }
            Err(error) => {
                problems.push(Problem::new(
                    "config file",
                    Some(path.display().to_string()),
                    required_by.unwrap_or(Source::Default),
                    format!("cannot be read: {error}"),
                ));
                return None;
            }
        };
        let file_source = |line| Source::File {
            path: path.to_owned(),
            line,
        };
        let doc = match Document::parse(text.clone()) {
            Ok(doc) => doc,
            Err(error) => {
                let line = error.span().map(|span| line_at(&text, span.start));
                problems.push(Problem::new(
                    "config file",
                    None,
                    file_source(line),
                    format!("is not valid TOML: {}", error.message().trim()),
                ));
                return None;
            }
        };
        let data = Toml::string(&text).data();
        let mut tables = match data {
            Ok(mut map) => map.remove(&Profile::Default).unwrap_or_default(),
            Err(error) => {
                problems.push(Problem::new(
                    "config file",
                    None,
                    file_source(None),
                    format!("is not valid TOML: {}", error.kind),
                ));
                return None;
            }
        };
        let file = ConfigFile {
            path: path.to_owned(),
            doc,
            tables: Dict::new(),
        };
        // Every top-level entry must be one of the known tables.
        let names: Vec<String> = tables.keys().cloned().collect();
        for name in names {
            let source = file_source(file.line_of_top(&name));
            match tables.get(&name) {
                Some(Value::Dict(..)) if TABLES.contains(&name.as_str()) => {}
                Some(Value::Dict(..)) => {
                    let hint = match closest(&name, TABLES) {
                        Some(best) => format!("did you mean [{best}]? "),
                        None => String::new(),
                    };
                    problems.push(Problem::new(
                        name.clone(),
                        None,
                        source,
                        format!(
                            "unknown table [{name}]; {hint}the tables are [default] and one per \
                             environment: [development], [test], [staging], [production]"
                        ),
                    ));
                    tables.remove(&name);
                }
                _ => {
                    problems.push(Problem::new(
                        name.clone(),
                        None,
                        source,
                        format!(
                            "keys belong in a table: put `{name}` under [default] (every \
                             environment) or under [development], [test], [staging] or [production]"
                        ),
                    ));
                    tables.remove(&name);
                }
            }
        }
        Some(ConfigFile { tables, ..file })
    }

    /// The table of `name` (`default` or an environment), if the file has it.
    pub(super) fn table(&self, name: &str) -> Option<Dict> {
        match self.tables.get(name) {
            Some(Value::Dict(_, dict)) => Some(dict.clone()),
            _ => None,
        }
    }

    /// The line of a top-level entry.
    fn line_of_top(&self, name: &str) -> Option<usize> {
        let (key, item) = self.doc.as_table().get_key_value(name)?;
        let span = key.span().or_else(|| item.span())?;
        Some(line_at(self.doc.raw(), span.start))
    }

    /// The line of `key` (`pool.max_size`, `replicas[1]`) in `[table]`, or of
    /// the nearest enclosing key that the file names.
    pub(super) fn line_of(&self, table: &str, key: &str) -> Option<usize> {
        let (table_key, item) = self.doc.as_table().get_key_value(table)?;
        let mut best = table_key.span().or_else(|| item.span());
        let mut node = Node::Item(item);
        for segment in segments(key) {
            match node.child(&segment) {
                Some((span, next)) => {
                    if span.is_some() {
                        best = span;
                    }
                    node = next;
                }
                None => break,
            }
        }
        best.map(|span| line_at(self.doc.raw(), span.start))
    }

    /// The environment named in `[default]`, with its line.
    pub(super) fn environment(&self) -> Option<(String, Source)> {
        let value = self.table("default")?.get("environment").cloned()?;
        let source = Source::File {
            path: self.path.clone(),
            line: self.line_of("default", "environment"),
        };
        match value {
            Value::String(_, name) => Some((name, source)),
            other => Some((format!("{other:?}"), source)),
        }
    }

    /// Problems with `environment` set inside an environment's own table.
    pub(super) fn misplaced_environment(&self, problems: &mut Vec<Problem>) {
        for environment in Environment::ALL {
            let name = environment.as_str();
            if self
                .table(name)
                .is_some_and(|t| t.contains_key("environment"))
            {
                problems.push(Problem::new(
                    "environment",
                    None,
                    Source::File {
                        path: self.path.clone(),
                        line: self.line_of(name, "environment"),
                    },
                    format!(
                        "cannot be set inside [{name}], which applies once the environment is \
                         chosen; set it in [default], or with APP_ENV / PGSTACK_ENV"
                    ),
                ));
            }
        }
    }
}

/// A position while walking down the document.
enum Node<'a> {
    Item(&'a Item),
    Table(&'a toml_edit::Table),
    Value(&'a toml_edit::Value),
}

type Span = Option<std::ops::Range<usize>>;

impl<'a> Node<'a> {
    /// The child named `segment` (a key, or an index into an array), with
    /// the span of its key (or of the element).
    fn child(&self, segment: &str) -> Option<(Span, Node<'a>)> {
        if let Ok(index) = segment.parse::<usize>() {
            return match self {
                Node::Item(Item::ArrayOfTables(array)) => {
                    array.get(index).map(|t| (t.span(), Node::Table(t)))
                }
                Node::Item(Item::Value(toml_edit::Value::Array(array)))
                | Node::Value(toml_edit::Value::Array(array)) => {
                    array.get(index).map(|v| (v.span(), Node::Value(v)))
                }
                _ => None,
            };
        }
        let table: &'a dyn toml_edit::TableLike = match self {
            Node::Item(item) => item.as_table_like()?,
            Node::Table(table) => *table,
            Node::Value(value) => value.as_inline_table()?,
        };
        table
            .get_key_value(segment)
            .map(|(k, v)| (k.span().or_else(|| v.span()), Node::Item(v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> ConfigFile {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pgstack.toml");
        std::fs::write(&path, text).unwrap();
        let mut problems = Vec::new();
        let file = ConfigFile::read(&path, None, &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        file.unwrap()
    }

    #[test]
    fn lines_of_dotted_keys_tables_inline_tables_and_arrays() {
        let file = parsed(
            "[default]\n\
             pool.max_size = 3\n\
             primary = { host = \"h\", port = 1 }\n\
             \n\
             \n\
             [default.retry]\n\
             jitter = \"full\"\n\
             \n\
             [[production.replicas]]\n\
             host = \"r1\"\n\
             [[production.replicas]]\n\
             host = \"r2\"\n",
        );
        assert_eq!(file.line_of("default", "pool.max_size"), Some(2));
        assert_eq!(file.line_of("default", "primary.port"), Some(3));
        assert_eq!(file.line_of("default", "retry.jitter"), Some(7));
        assert_eq!(file.line_of("production", "replicas.1.host"), Some(12));
        // Not in the file: the nearest enclosing key.
        assert_eq!(file.line_of("default", "retry.max_backoff"), Some(6));
        assert_eq!(line_at("a\nb\nc", 4), 3);
    }
}
