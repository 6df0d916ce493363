//! Test helpers: a metrics recorder and a tracing capture.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::io::Write;
use std::sync::{Arc, Mutex};

use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, Key, KeyName, Metadata, Recorder, SharedString,
    Unit,
};

/// One metric update: name, labels (k=v, sorted), value.
#[derive(Clone, Debug, PartialEq)]
pub struct Update {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// Records every counter increment and gauge set, in order.
#[derive(Clone, Default)]
pub struct TestRecorder {
    pub updates: Arc<Mutex<Vec<Update>>>,
}

struct Handle {
    key: Key,
    updates: Arc<Mutex<Vec<Update>>>,
}

impl Handle {
    fn push(&self, value: f64) {
        let mut labels: Vec<_> = self
            .key
            .labels()
            .map(|l| (l.key().to_owned(), l.value().to_owned()))
            .collect();
        labels.sort();
        self.updates.lock().unwrap().push(Update {
            name: self.key.name().to_owned(),
            labels,
            value,
        });
    }
}

impl CounterFn for Handle {
    fn increment(&self, value: u64) {
        self.push(value as f64);
    }
    fn absolute(&self, value: u64) {
        self.push(value as f64);
    }
}

impl GaugeFn for Handle {
    fn increment(&self, value: f64) {
        self.push(value);
    }
    fn decrement(&self, value: f64) {
        self.push(-value);
    }
    fn set(&self, value: f64) {
        self.push(value);
    }
}

impl Recorder for TestRecorder {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(Arc::new(Handle {
            key: key.clone(),
            updates: self.updates.clone(),
        }))
    }
    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(Arc::new(Handle {
            key: key.clone(),
            updates: self.updates.clone(),
        }))
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

impl TestRecorder {
    pub fn updates_of(&self, name: &str) -> Vec<Update> {
        self.updates
            .lock()
            .unwrap()
            .iter()
            .filter(|u| u.name == name)
            .cloned()
            .collect()
    }
}

/// Captured log lines of a tracing fmt subscriber.
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    pub fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }

    /// The process-wide capture (a global subscriber at DEBUG, installed on
    /// first use). Global, because tracing caches per-callsite interest and a
    /// thread-local subscriber can miss events hit first by other test threads.
    /// Tests filter the text by a name of their own.
    pub fn global() -> Logs {
        static LOGS: std::sync::OnceLock<Logs> = std::sync::OnceLock::new();
        LOGS.get_or_init(|| {
            let logs = Logs::default();
            let writer = logs.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_max_level(tracing::Level::DEBUG)
                .with_ansi(false)
                .without_time()
                .with_writer(move || writer.clone())
                .finish();
            tracing::subscriber::set_global_default(subscriber).unwrap();
            logs
        })
        .clone()
    }
}

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
