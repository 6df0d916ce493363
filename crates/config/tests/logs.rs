//! Logs never show a password. Alone in its own test binary: tracing caches
//! per call site whether anyone listens, and a test on another thread with no
//! subscriber could make this one miss events.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::load_env;
use pgstack_config::{Explained, REDACTED};

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

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn logs_do_not_show_the_password() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        let config = loaded().into_config();
        tracing::info!(?config, primary = %config.primary, "service configured");
        let _ = load_env(&[("DATABASE_URL", &format!("postgres://app:{SECRET}@:1/x"))]);
    });
    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("configuration loaded"), "{logs}");
    assert!(logs.contains("configuration invalid"), "{logs}");
    assert!(logs.contains(REDACTED), "{logs}");
    assert_hidden(&logs);
}
