//! Tracing set-up for server processes: logs to stderr, filtered by `KEEPNET_LOG`.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber (once; later calls do nothing). Every line carries the
/// server's name through the span the runtime enters.
pub fn init() {
    let filter = EnvFilter::try_from_env("KEEPNET_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        // Server logs go to files: colour codes only on a terminal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
