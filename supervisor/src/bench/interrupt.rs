//! Ctrl-C for benchmarks that own namespaces and child processes: SIGINT, SIGTERM and SIGHUP
//! set a flag instead of ending the process, so the benchmark stops at its next check and
//! its guards (namespaces, child processes, instances) clean up on the way out.
//!
//! [`catch`] blocks the three signals in the calling thread (and so in every thread it
//! starts afterwards) and starts one thread that waits for them. Child processes are not
//! affected: `std::process::Command` clears the signal mask in the child.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Once;

use nix::sys::signal::{SigSet, Signal};

use crate::error::{Error, Result};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static INSTALL: Once = Once::new();

/// Starts catching SIGINT, SIGTERM and SIGHUP (once per process). Call it from the main
/// thread before starting other threads.
pub fn catch() {
    INSTALL.call_once(|| {
        let mut set = SigSet::empty();
        for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
            set.add(s);
        }
        if set.thread_block().is_err() {
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || loop {
                if let Ok(sig) = set.wait() {
                    eprintln!("keepnet: {sig}: stopping and cleaning up");
                    INTERRUPTED.store(true, Ordering::SeqCst);
                }
            });
        if spawned.is_err() {
            // Nobody would see the signals: let them act as usual again.
            let _ = set.thread_unblock();
        }
    });
}

/// True once a signal has asked the process to stop.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// An error if a signal has asked the process to stop.
pub fn check() -> Result<()> {
    if interrupted() {
        Err(Error::Peer("interrupted".into()))
    } else {
        Ok(())
    }
}
