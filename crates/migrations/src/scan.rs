//! A migration script split into statements, read from sqlparser's tokens.
//!
//! The tokenizer (PostgreSQL dialect: dollar quoting, `E''` strings, nested
//! comments, quoted identifiers) is the same one pgstack-pool classifies
//! statements with, so keywords inside strings, comments, dollar-quoted
//! bodies and quoted identifiers never count. The linter reads the
//! statements; the migrator asks what a `-- no-transaction` script is made of
//! (whether a lock timeout can have left anything behind, which indexes it
//! builds concurrently).

use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::tokenizer::{Token, TokenWithSpan, Tokenizer, Whitespace, Word};

/// One token that is neither whitespace nor a comment.
#[derive(Clone, Debug)]
pub(crate) struct Tok {
    pub(crate) token: Token,
    /// 1-based line of its first character.
    pub(crate) line: u32,
    /// Byte offset of its first character.
    pub(crate) offset: usize,
}

/// A comment.
#[derive(Clone, Debug)]
pub(crate) struct Comment {
    /// The text without `--` or `/* */`.
    pub(crate) text: String,
}

/// One statement: its tokens (without the closing `;`) and the comments
/// that belong to it (those since the previous statement, those inside it,
/// and those after its `;` on the same line).
#[derive(Clone, Debug)]
pub(crate) struct Statement {
    pub(crate) tokens: Vec<Tok>,
    pub(crate) comments: Vec<Comment>,
    /// Byte range of the statement text, first token to the `;` (or the end).
    pub(crate) start: usize,
    pub(crate) end: usize,
}

/// Text the tokenizer could not read (an unterminated string, quoted
/// identifier or comment).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ScanError {
    pub(crate) line: u32,
    pub(crate) message: String,
}

/// Splits `sql` into statements at the `;` that are not quoted.
pub(crate) fn statements(sql: &str) -> Result<Vec<Statement>, ScanError> {
    let tokens = Tokenizer::new(&PostgreSqlDialect {}, sql)
        .with_unescape(false)
        .tokenize_with_location()
        .map_err(|e| ScanError {
            line: u32::try_from(e.location.line).unwrap_or(u32::MAX),
            message: e.message,
        })?;
    let lines = LineIndex::new(sql);
    let mut out: Vec<Statement> = Vec::new();
    let mut current: Vec<Tok> = Vec::new();
    let mut pending: Vec<Comment> = Vec::new();
    // The line of the `;` that closed the last statement, while nothing but
    // spaces followed it: a comment there belongs to that statement.
    let mut trailing: Option<u64> = None;
    for TokenWithSpan { token, span } in tokens {
        match token {
            Token::Whitespace(Whitespace::Newline) => trailing = None,
            Token::Whitespace(Whitespace::Space | Whitespace::Tab) => {}
            Token::Whitespace(Whitespace::SingleLineComment { comment, .. }) => {
                attach(comment, span.start.line, trailing, &mut out, &mut pending);
                // a `--` comment runs to the end of its line
                trailing = None;
            }
            Token::Whitespace(Whitespace::MultiLineComment(text)) => {
                attach(text, span.start.line, trailing, &mut out, &mut pending);
            }
            Token::SemiColon => {
                let end = lines.offset(span.start.line, span.start.column);
                if let Some(statement) = close(&mut current, &mut pending, end) {
                    out.push(statement);
                    trailing = Some(span.start.line);
                }
            }
            Token::EOF => {}
            token => {
                trailing = None;
                current.push(Tok {
                    token,
                    line: u32::try_from(span.start.line).unwrap_or(u32::MAX),
                    offset: lines.offset(span.start.line, span.start.column),
                });
            }
        }
    }
    if let Some(statement) = close(&mut current, &mut pending, sql.len()) {
        out.push(statement);
    }
    Ok(out)
}

/// A comment after a statement's `;` on the same line belongs to that
/// statement; any other to the next one.
fn attach(
    text: String,
    line: u64,
    trailing: Option<u64>,
    out: &mut [Statement],
    pending: &mut Vec<Comment>,
) {
    let comment = Comment { text };
    match (trailing, out.last_mut()) {
        (Some(after), Some(last)) if after == line => last.comments.push(comment),
        _ => pending.push(comment),
    }
}

fn close(current: &mut Vec<Tok>, pending: &mut Vec<Comment>, end: usize) -> Option<Statement> {
    let first = current.first()?;
    let start = first.offset;
    Some(Statement {
        tokens: std::mem::take(current),
        comments: std::mem::take(pending),
        start,
        end: end.max(start),
    })
}

/// Byte offsets of (line, column) positions, columns counted in characters
/// as the tokenizer counts them.
struct LineIndex<'a> {
    sql: &'a str,
    starts: Vec<usize>,
}

impl<'a> LineIndex<'a> {
    fn new(sql: &'a str) -> Self {
        let mut starts = vec![0];
        starts.extend(sql.match_indices('\n').map(|(i, _)| i + 1));
        LineIndex { sql, starts }
    }

    fn offset(&self, line: u64, column: u64) -> usize {
        let Some(&start) = usize::try_from(line)
            .ok()
            .and_then(|l| l.checked_sub(1))
            .and_then(|l| self.starts.get(l))
        else {
            return self.sql.len();
        };
        let column = usize::try_from(column.saturating_sub(1)).unwrap_or(usize::MAX);
        self.sql[start..]
            .char_indices()
            .nth(column)
            .map_or(self.sql.len(), |(i, _)| start + i)
    }
}

impl Statement {
    /// The token at `i`.
    pub(crate) fn token(&self, i: usize) -> Option<&Token> {
        self.tokens.get(i).map(|t| &t.token)
    }

    /// Whether the token at `i` is the unquoted keyword `keyword` (given in
    /// capitals).
    pub(crate) fn kw(&self, i: usize, keyword: &str) -> bool {
        self.token(i).is_some_and(|t| is_kw(t, keyword))
    }

    /// The index of the first unquoted keyword `keyword` at or after `from`.
    pub(crate) fn find_kw(&self, from: usize, keyword: &str) -> Option<usize> {
        (from..self.tokens.len()).find(|&i| self.kw(i, keyword))
    }

    /// Whether the statement has the unquoted keyword `keyword` anywhere.
    pub(crate) fn has_kw(&self, keyword: &str) -> bool {
        self.find_kw(0, keyword).is_some()
    }

    /// The 1-based line of the token at `i` (the statement's last line when
    /// `i` is past the end).
    pub(crate) fn line_at(&self, i: usize) -> u32 {
        self.tokens
            .get(i)
            .or(self.tokens.last())
            .map_or(1, |t| t.line)
    }

    /// A (possibly schema-qualified) name starting at `i`: its last part
    /// (folded to lower case unless quoted), the whole name as written, and
    /// the index after it.
    pub(crate) fn name_at(&self, i: usize) -> Option<Name> {
        let mut parts = Vec::new();
        let mut j = i;
        while let Some(Token::Word(w)) = self.token(j) {
            parts.push(ident(w));
            j += 1;
            if self.token(j) == Some(&Token::Period) {
                j += 1;
            } else {
                break;
            }
        }
        let name = parts.pop()?;
        Some(Name {
            schema: parts.pop(),
            name,
            next: j,
        })
    }

    /// The statement text with runs of whitespace collapsed, cut to about
    /// `max` characters.
    pub(crate) fn excerpt(&self, sql: &str, max: usize) -> String {
        let text = sql.get(self.start..self.end).unwrap_or_default();
        let mut out = String::new();
        for (n, word) in text.split_whitespace().enumerate() {
            if n > 0 {
                out.push(' ');
            }
            out.push_str(word);
            if out.chars().count() > max {
                let cut: String = out.chars().take(max).collect();
                return format!("{}…", cut.trim_end());
            }
        }
        out
    }
}

/// A relation name as read from a statement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Name {
    pub(crate) schema: Option<String>,
    pub(crate) name: String,
    pub(crate) next: usize,
}

impl Name {
    /// `schema.name` or `name`.
    pub(crate) fn display(&self) -> String {
        match &self.schema {
            Some(schema) => format!("{schema}.{}", self.name),
            None => self.name.clone(),
        }
    }
}

/// Whether `token` is the unquoted keyword `keyword` (given in capitals).
pub(crate) fn is_kw(token: &Token, keyword: &str) -> bool {
    matches!(token, Token::Word(w) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case(keyword))
}

/// An identifier as PostgreSQL resolves it: quoted ones as written,
/// unquoted ones in lower case.
pub(crate) fn ident(word: &Word) -> String {
    if word.quote_style.is_some() {
        word.value.clone()
    } else {
        word.value.to_lowercase()
    }
}

/// What a `-- no-transaction` script is made of, for the migrator.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Shape {
    /// Every statement is a `CONCURRENTLY` index or partition operation
    /// (which waits for other transactions by design and queues no reader
    /// or writer behind it).
    pub(crate) only_concurrently: bool,
    /// PostgreSQL runs the script all-or-nothing: no transaction control,
    /// and nothing that commits on its own (`CONCURRENTLY`, `VACUUM`,
    /// `CALL`, `DO`, `CLUSTER`, `REINDEX SCHEMA|DATABASE|SYSTEM`). A failure
    /// then leaves nothing behind.
    pub(crate) atomic: bool,
    /// Indexes built with `CREATE INDEX CONCURRENTLY`: `(schema, name)`.
    pub(crate) concurrent_indexes: Vec<(Option<String>, String)>,
}

/// Reads the shape of `sql`. Text that cannot be read is neither atomic nor
/// only concurrent.
pub(crate) fn shape(sql: &str) -> Shape {
    let Ok(statements) = statements(sql) else {
        return Shape::default();
    };
    let mut shape = Shape {
        only_concurrently: !statements.is_empty(),
        atomic: true,
        concurrent_indexes: Vec::new(),
    };
    for s in &statements {
        let concurrent = concurrent_operation(s).is_some();
        shape.only_concurrently &= concurrent;
        if concurrent || commits_on_its_own(s) {
            shape.atomic = false;
        }
        if let Some(index) = created_index(s)
            && index.concurrently
            && let Some(name) = index.name
        {
            shape.concurrent_indexes.push((name.schema, name.name));
        }
    }
    shape
}

fn commits_on_its_own(s: &Statement) -> bool {
    let first = [
        "BEGIN",
        "START",
        "COMMIT",
        "END",
        "ROLLBACK",
        "ABORT",
        "SAVEPOINT",
        "RELEASE",
    ];
    if first.iter().any(|k| s.kw(0, k)) {
        return true;
    }
    if ["VACUUM", "CALL", "DO", "CLUSTER"]
        .iter()
        .any(|k| s.kw(0, k))
    {
        return true;
    }
    (s.kw(0, "PREPARE") && s.kw(1, "TRANSACTION"))
        || (s.kw(0, "REINDEX") && ["SCHEMA", "DATABASE", "SYSTEM"].iter().any(|k| s.has_kw(k)))
}

/// For a statement that must run outside a transaction because of
/// `CONCURRENTLY`, what it is (`"CREATE INDEX CONCURRENTLY"`).
pub(crate) fn concurrent_operation(s: &Statement) -> Option<&'static str> {
    if !s.has_kw("CONCURRENTLY") {
        return None;
    }
    if s.kw(0, "CREATE") && (s.kw(1, "INDEX") || (s.kw(1, "UNIQUE") && s.kw(2, "INDEX"))) {
        return Some("CREATE INDEX CONCURRENTLY");
    }
    if s.kw(0, "DROP") && s.kw(1, "INDEX") {
        return Some("DROP INDEX CONCURRENTLY");
    }
    if s.kw(0, "REINDEX") {
        return Some("REINDEX CONCURRENTLY");
    }
    if s.kw(0, "ALTER") && s.kw(1, "TABLE") && s.has_kw("DETACH") {
        return Some("DETACH PARTITION CONCURRENTLY");
    }
    None
}

/// A `CREATE [UNIQUE] INDEX` statement, read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CreatedIndex {
    pub(crate) concurrently: bool,
    pub(crate) name: Option<Name>,
    /// `ON ONLY`: a partitioned table's own index, built per partition.
    pub(crate) only: bool,
    pub(crate) table: Option<Name>,
    /// Index of the `ON` keyword's table name.
    pub(crate) table_at: usize,
}

/// Reads `CREATE [UNIQUE] INDEX [CONCURRENTLY] [IF NOT EXISTS] [name] ON
/// [ONLY] table`.
pub(crate) fn created_index(s: &Statement) -> Option<CreatedIndex> {
    if !s.kw(0, "CREATE") {
        return None;
    }
    let mut i = 1;
    if s.kw(i, "UNIQUE") {
        i += 1;
    }
    if !s.kw(i, "INDEX") {
        return None;
    }
    i += 1;
    let concurrently = s.kw(i, "CONCURRENTLY");
    if concurrently {
        i += 1;
    }
    if s.kw(i, "IF") && s.kw(i + 1, "NOT") && s.kw(i + 2, "EXISTS") {
        i += 3;
    }
    let name = if s.kw(i, "ON") {
        None
    } else {
        let name = s.name_at(i)?;
        i = name.next;
        Some(name)
    };
    if !s.kw(i, "ON") {
        return None;
    }
    i += 1;
    let only = s.kw(i, "ONLY");
    if only {
        i += 1;
    }
    Some(CreatedIndex {
        concurrently,
        name,
        only,
        table: s.name_at(i),
        table_at: i,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &Statement) -> Vec<String> {
        s.tokens.iter().map(|t| t.token.to_string()).collect()
    }

    #[test]
    fn splits_at_unquoted_semicolons_only() {
        let sql = "-- head\nCREATE TABLE a (x text DEFAULT ';');\n\
                   DO $$ BEGIN PERFORM 1; END $$; /* tail; */\n\
                   SELECT \"semi;colon\" FROM a -- no semicolon at the end";
        let list = statements(sql).unwrap();
        assert_eq!(list.len(), 3);
        assert_eq!(words(&list[0])[0], "CREATE");
        assert_eq!(list[0].comments.len(), 1, "the leading comment");
        assert_eq!(list[1].tokens.len(), 2, "DO and its dollar-quoted body");
        assert_eq!(
            list[1]
                .comments
                .iter()
                .map(|c| c.text.as_str())
                .collect::<Vec<_>>(),
            vec![" tail; "],
            "a comment after the `;` on the same line belongs to the statement"
        );
        assert_eq!(list[2].tokens[0].line, 4);
        assert_eq!(list[2].comments.len(), 1);
        assert_eq!(list[1].excerpt(sql, 200), "DO $$ BEGIN PERFORM 1; END $$");
        assert_eq!(list[0].excerpt(sql, 12), "CREATE TABLE…", "cut and trimmed");
    }

    #[test]
    fn offsets_count_characters_as_the_tokenizer_does() {
        let sql = "SELECT 'é';\nSELECT 2;";
        let list = statements(sql).unwrap();
        assert_eq!(&sql[list[1].start..list[1].end], "SELECT 2");
        assert_eq!(&sql[list[0].start..list[0].end], "SELECT 'é'");
    }

    #[test]
    fn unterminated_text_is_an_error_with_a_line() {
        let err = statements("SELECT 1;\nSELECT 'oops").unwrap_err();
        assert_eq!(err.line, 2);
        assert!(shape("SELECT 'oops") == Shape::default());
    }

    #[test]
    fn names_fold_unless_quoted() {
        let list = statements("ALTER TABLE Public.\"Bills\" ADD x int").unwrap();
        let name = list[0].name_at(2).unwrap();
        assert_eq!(name.schema.as_deref(), Some("public"));
        assert_eq!(name.name, "Bills");
        assert_eq!(name.display(), "public.Bills");
    }

    #[test]
    fn shapes_of_no_transaction_scripts() {
        let cic = shape(
            "-- no-transaction\nCREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS s.i ON t (x);",
        );
        assert!(cic.only_concurrently && !cic.atomic);
        assert_eq!(
            cic.concurrent_indexes,
            vec![(Some("s".to_owned()), "i".to_owned())]
        );
        let plain = shape("ALTER TABLE t ADD c int; UPDATE t SET c = 1;");
        assert!(plain.atomic && !plain.only_concurrently);
        for not_atomic in [
            "BEGIN; ALTER TABLE t ADD c int; COMMIT;",
            "VACUUM t",
            "CALL backfill()",
            "DO $$ BEGIN COMMIT; END $$",
            "REINDEX DATABASE app",
            "DROP INDEX CONCURRENTLY i",
        ] {
            assert!(!shape(not_atomic).atomic, "{not_atomic}");
        }
        // keywords in strings, comments and quoted names do not count
        let quoted = shape("INSERT INTO log VALUES ('COMMIT; VACUUM'); /* BEGIN */ SELECT \"do\"");
        assert!(quoted.atomic);
    }
}
