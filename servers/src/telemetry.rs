//! Tracing set-up for server processes: logs to stderr, filtered by `KEEPNET_LOG`.
//!
//! A live update's successor defers its log lines from the handover order to its first poll
//! ([`defer_logs`], [`flush_deferred_logs`]): each line is a write(2), and until the first
//! poll every microsecond is blackout.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use tracing_subscriber::EnvFilter;

static DEFER: AtomicBool = AtomicBool::new(false);
static DEFERRED: Mutex<Vec<u8>> = Mutex::new(Vec::new());

/// Stderr, or the deferred buffer while [`defer_logs`] holds.
struct Out;

impl Write for Out {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if DEFER.load(Ordering::Relaxed) {
            if let Ok(mut d) = DEFERRED.lock() {
                d.extend_from_slice(buf);
                return Ok(buf.len());
            }
        }
        std::io::stderr().write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Keeps log lines in memory until [`flush_deferred_logs`].
pub fn defer_logs() {
    DEFER.store(true, Ordering::SeqCst);
}

/// Writes the deferred lines and logs directly again (nothing to do if none were deferred).
pub fn flush_deferred_logs() {
    if !DEFER.swap(false, Ordering::SeqCst) {
        return;
    }
    let lines = DEFERRED
        .lock()
        .map(|mut d| std::mem::take(&mut *d))
        .unwrap_or_default();
    let _ = std::io::stderr().write_all(&lines);
}

/// Installs the global subscriber (once; later calls do nothing). Every line carries the
/// server's name through the span the runtime enters.
pub fn init() {
    let filter = EnvFilter::try_from_env("KEEPNET_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| Out)
        .with_target(false)
        // Server logs go to files: colour codes only on a terminal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
