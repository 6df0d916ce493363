//! Progress bars: shown on a terminal, hidden for JSON output and pipes.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar of `len` steps, drawn on stderr only when it is a terminal and the output is not JSON.
pub(crate) fn bar(json: bool, len: u64, prefix: &'static str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    if json || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    if let Ok(style) = ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(prefix);
    bar
}

/// A spinner that counts bytes (e.g. of a file being written), drawn on
/// stderr only when it is a terminal and the output is not JSON.
pub(crate) fn bytes_spinner(json: bool, prefix: &'static str) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    if json || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    if let Ok(style) = ProgressStyle::with_template("{spinner} {prefix} {bytes} {wide_msg}") {
        bar.set_style(style);
    }
    bar.set_prefix(prefix);
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}
