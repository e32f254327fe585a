//! The supervisor daemon and the commands that talk to it.
//!
//! `keepnet up` starts a daemon (a new session, logs in the runtime directory) that owns
//! every shared region and the TAP device, starts the servers, and answers requests on a
//! Unix socket in the runtime directory: status, the link region for a capture, down.

pub mod apps;
pub mod client;
pub mod daemon;
pub mod demo;
pub mod instance;
pub mod lab;
pub mod protocol;
pub mod services;
pub mod status;

use std::path::PathBuf;

/// The runtime directory of an instance: control socket, state file, log.
pub fn run_dir(instance: &str) -> PathBuf {
    let base = std::env::var_os("KEEPNET_RUN_DIR")
        .map_or_else(|| PathBuf::from("/run/keepnet"), PathBuf::from);
    base.join(instance)
}

/// The control socket of an instance.
pub fn socket_path(instance: &str) -> PathBuf {
    run_dir(instance).join("ctl.sock")
}

/// The state file of an instance.
pub fn state_path(instance: &str) -> PathBuf {
    run_dir(instance).join("state.json")
}

/// The daemon's log file.
pub fn log_path(instance: &str) -> PathBuf {
    run_dir(instance).join("supervisor.log")
}
