//! OpenTelemetry's stable database conventions, beside the `pgstack_`
//! names: the attributes of each call's span and the
//! `db.client.operation.duration` histogram. The hot path calls
//! [`finished`] once per call, and records a success's duration through the
//! handle of [`histogram`] resolved once per (operation, route, node).
//!
//! | span attribute | value |
//! |---|---|
//! | `db.system.name` | `postgresql` |
//! | `db.namespace` | the node's database |
//! | `db.operation.name` | the call's operation name |
//! | `db.query.text` | the statement's SQL (never parameters), with `telemetry.query_text` |
//! | `db.response.status_code` | the SQLSTATE of a server error |
//! | `server.address`, `server.port` | the node that answered |
//! | `error.type` | the SQLSTATE, else the kind of failure (`timeout`, `connection`, …) |

use std::time::Duration;

use metrics::{Histogram, SharedString};
use pgstack_config::NodeSettings;

use crate::error::Error;
use crate::node::Node;
use crate::route::Op;

/// Histogram of call durations in seconds (OpenTelemetry's
/// `db.client.operation.duration`), labelled `db.system.name`,
/// `db.operation.name`, `db.namespace`, `server.address`, `server.port`,
/// and on failure `error.type` and `db.response.status_code`.
pub const OPERATION_DURATION_METRIC: &str = "db.client.operation.duration";

/// `db.system.name` for PostgreSQL.
pub const DB_SYSTEM: &str = "postgresql";

/// A call's span with every OpenTelemetry attribute declared (those known
/// later recorded as they become known). `otel.kind = "client"` makes
/// tracing-opentelemetry export it as a client span, and
/// `otel.status_code = "error"` marks a failed one.
macro_rules! call_span {
    ($name:literal, $op:expr, $route:expr) => {
        tracing::debug_span!(
            $name,
            op = $op.name(),
            route = $route.as_str(),
            node = tracing::field::Empty,
            attempt = tracing::field::Empty,
            "otel.kind" = "client",
            "db.system.name" = $crate::telemetry::DB_SYSTEM,
            "db.operation.name" = $op.name(),
            "db.namespace" = tracing::field::Empty,
            "db.query.text" = tracing::field::Empty,
            "db.response.status_code" = tracing::field::Empty,
            "server.address" = tracing::field::Empty,
            "server.port" = tracing::field::Empty,
            "error.type" = tracing::field::Empty,
            "otel.status_code" = tracing::field::Empty,
        )
    };
}
pub(crate) use call_span;

/// What a node's calls carry: where it is, as attributes and labels.
pub(crate) struct NodeAttributes {
    address: SharedString,
    port: u16,
    port_label: SharedString,
    namespace: SharedString,
}

impl NodeAttributes {
    pub(crate) fn new(settings: &NodeSettings) -> Self {
        NodeAttributes {
            address: SharedString::from(settings.host.clone()),
            port: settings.port,
            port_label: SharedString::from(settings.port.to_string()),
            namespace: SharedString::from(settings.database.clone()),
        }
    }
}

/// The [`OPERATION_DURATION_METRIC`] histogram of `op`'s calls on `node`
/// (the server's labels left out when no node answered): successful ones
/// when `error` is `None`, else those that failed with that kind and
/// SQLSTATE. A success's is resolved once per (operation, route, node) and
/// kept with the call's other series (`stats::SeriesCache`), so a
/// successful call records it without a look-up of its own.
pub(crate) fn histogram(
    op: &Op,
    node: Option<&Node>,
    error: Option<(&'static str, Option<String>)>,
) -> Histogram {
    let mut labels = vec![
        metrics::Label::new("db.system.name", DB_SYSTEM),
        metrics::Label::new("db.operation.name", op.label()),
    ];
    if let Some(node) = node {
        let attributes = &node.inner.attributes;
        labels.push(metrics::Label::new(
            "db.namespace",
            attributes.namespace.clone(),
        ));
        labels.push(metrics::Label::new(
            "server.address",
            attributes.address.clone(),
        ));
        labels.push(metrics::Label::new(
            "server.port",
            attributes.port_label.clone(),
        ));
    }
    if let Some((kind, code)) = error {
        match code {
            Some(code) => {
                labels.push(metrics::Label::new("error.type", code.clone()));
                labels.push(metrics::Label::new("db.response.status_code", code));
            }
            None => labels.push(metrics::Label::new("error.type", kind)),
        }
    }
    metrics::histogram!(OPERATION_DURATION_METRIC, labels)
}

/// The kind of failure, for `error.type` when there is no SQLSTATE.
pub(crate) fn error_kind(error: &Error) -> &'static str {
    match error {
        Error::PoolTimeout { .. } => "pool_timeout",
        Error::CircuitOpen { .. } => "circuit_open",
        Error::Unavailable { .. } => "unavailable",
        Error::Database(_) => "database",
        Error::Connection { .. } => "connection",
        Error::Timeout { .. } => "timeout",
        Error::CommitOutcomeUnknown { .. } => "commit_outcome_unknown",
        Error::CommitLost { .. } => "commit_lost",
        Error::PartiallyApplied { .. } => "partially_applied",
        Error::TransactionAborted { .. } => "transaction_aborted",
        Error::RolledBack { .. } => "rolled_back",
        Error::ShuttingDown { .. } => "shutting_down",
        Error::NoPrimary { .. } => "no_primary",
        Error::Usage { .. } => "usage",
        Error::Client { .. } => "client",
        Error::UnexpectedRows { .. } => "unexpected_rows",
        Error::RowMapping { .. } => "row_mapping",
        Error::Aborted(_) => "aborted",
        Error::Pool { .. } => "pool",
        Error::Config(_) => "config",
    }
}

/// Records the node that answered the call, on the call's span (once: an
/// exporter keeps every value recorded).
fn record_node(span: &tracing::Span, node: &Node) {
    if span.is_disabled() {
        return;
    }
    let attributes = &node.inner.attributes;
    span.record("db.namespace", &*attributes.namespace);
    span.record("server.address", &*attributes.address);
    // As i64: OpenTelemetry's integer (tracing-opentelemetry would export
    // an unsigned value as text).
    span.record("server.port", i64::from(attributes.port));
}

/// Records the statement's text on its span when `enabled`
/// (`telemetry.query_text`).
pub(crate) fn record_query_text(span: &tracing::Span, sql: &str, enabled: bool) {
    if enabled && !span.is_disabled() {
        span.record("db.query.text", sql);
    }
}

/// One finished call: its outcome on the current span (the call's), and a
/// failure's duration in [`OPERATION_DURATION_METRIC`] (a success's is
/// recorded with the call's other series).
pub(crate) fn finished(node: Option<&Node>, op: &Op, elapsed: Duration, error: Option<&Error>) {
    // The call's span is a DEBUG span: when nothing listens at that level
    // it is disabled, and the current span is not even looked up.
    let span = if tracing::level_enabled!(tracing::Level::DEBUG) {
        tracing::Span::current()
    } else {
        tracing::Span::none()
    };
    if let Some(node) = node {
        record_node(&span, node);
    }
    let Some(error) = error else {
        return;
    };
    let seconds = elapsed.as_secs_f64();
    let code = error.code().map(str::to_owned);
    let kind = error_kind(error);
    if !span.is_disabled() {
        span.record("error.type", code.as_deref().unwrap_or(kind));
        span.record("otel.status_code", "error");
        if let Some(code) = &code {
            span.record("db.response.status_code", code.as_str());
        }
    }
    histogram(op, node, Some((kind, code))).record(seconds);
}
