#![allow(clippy::unwrap_used, clippy::expect_used)]
#![cfg(unix)]
//! `shutdown_on_signal` shuts down on SIGTERM. In a test binary of its own:
//! the signal goes to the whole process.

use std::time::Duration;

use pgstack_config::DatabaseConfig;
use pgstack_connection::{Error, Route};
use pgstack_orchestrator::{LifecycleState, Orchestrator, StartOptions};
use pgstack_tests::TestDb;

#[tokio::test]
async fn sigterm_shuts_down() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    let db = TestDb::new().await.unwrap();
    let mut config = DatabaseConfig::for_tests(db.url()).unwrap();
    config.migrations.auto_migrate = false;
    config.features.health_monitoring = false;
    let orchestrator = Orchestrator::start(config, StartOptions::new())
        .await
        .unwrap();
    let waiting = {
        let orchestrator = orchestrator.clone();
        tokio::spawn(async move {
            orchestrator
                .shutdown_on_signal(Duration::from_secs(1))
                .await
        })
    };
    // Nothing happens without the signal.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished());
    assert_eq!(orchestrator.state(), LifecycleState::Ready);

    kill(Pid::this(), Signal::SIGTERM).unwrap();
    let report = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(report.cut_off, 0);
    assert_eq!(orchestrator.state(), LifecycleState::Stopped);
    let error = orchestrator
        .cluster()
        .query("late", Route::Read, "SELECT 1", &[])
        .await
        .unwrap_err();
    assert!(matches!(error, Error::ShuttingDown { .. }), "{error:?}");
}
