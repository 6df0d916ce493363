//! Where alerts go: the [`AlertSink`] trait, a tracing sink and a channel sink.

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::alert::{Alert, AlertState, Severity};
use crate::error::SinkError;

/// A destination for alerts (a log, a channel, a pager, a webhook).
///
/// The monitor hands alerts to its sinks from a task of their own, one
/// alert at a time, each call bounded by a timeout, so a slow sink never
/// delays the probes.
///
/// ```
/// use async_trait::async_trait;
/// use pgstack_health::{Alert, AlertSink, SinkError};
///
/// struct Pager;
///
/// #[async_trait]
/// impl AlertSink for Pager {
///     fn name(&self) -> &str { "pager" }
///     async fn send(&self, alert: &Alert) -> Result<(), SinkError> {
///         // post `serde_json::to_string(alert)` to the pager's API ...
///         let _ = alert;
///         Ok(())
///     }
/// }
/// ```
#[async_trait]
pub trait AlertSink: Send + Sync + 'static {
    /// The sink's name, for logs and errors.
    fn name(&self) -> &str;

    /// Delivers one alert.
    async fn send(&self, alert: &Alert) -> Result<(), SinkError>;
}

/// Logs alerts with `tracing` (target `pgstack_health::alert`): critical and
/// high at `ERROR`, medium at `WARN`, low at `INFO`; resolutions at `INFO`.
/// The monitor's default sink.
#[derive(Clone, Copy, Debug, Default)]
pub struct TracingSink;

#[async_trait]
impl AlertSink for TracingSink {
    fn name(&self) -> &str {
        "tracing"
    }

    async fn send(&self, alert: &Alert) -> Result<(), SinkError> {
        let node = alert.node.as_deref().unwrap_or("cluster");
        macro_rules! log {
            ($level:expr, $text:literal) => {
                tracing::event!(
                    target: "pgstack_health::alert",
                    $level,
                    rule = %alert.rule,
                    severity = %alert.severity,
                    node,
                    detail = %alert.detail,
                    occurrences = alert.occurrences,
                    "{} {}",
                    $text,
                    alert.message
                )
            };
        }
        match (alert.state, alert.severity) {
            (AlertState::Resolved, _) => log!(tracing::Level::INFO, "resolved:"),
            (_, Severity::Critical | Severity::High) => log!(tracing::Level::ERROR, "alert:"),
            (_, Severity::Medium) => log!(tracing::Level::WARN, "alert:"),
            (_, _) => log!(tracing::Level::INFO, "alert:"),
        }
        Ok(())
    }
}

/// Sends alerts into a bounded tokio channel, for code that reacts to them
/// in process (and for tests). A full channel drops the alert with
/// [`SinkError::Full`]; it never blocks the monitor.
#[derive(Clone, Debug)]
pub struct ChannelSink {
    tx: mpsc::Sender<Alert>,
}

impl ChannelSink {
    /// A sink and the receiver of its alerts; `capacity` alerts are buffered
    /// (at least one).
    pub fn new(capacity: usize) -> (ChannelSink, mpsc::Receiver<Alert>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (ChannelSink { tx }, rx)
    }
}

#[async_trait]
impl AlertSink for ChannelSink {
    fn name(&self) -> &str {
        "channel"
    }

    async fn send(&self, alert: &Alert) -> Result<(), SinkError> {
        self.tx.try_send(alert.clone()).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SinkError::Full {
                sink: self.name().to_owned(),
            },
            mpsc::error::TrySendError::Closed(_) => SinkError::Closed {
                sink: self.name().to_owned(),
            },
        })
    }
}
