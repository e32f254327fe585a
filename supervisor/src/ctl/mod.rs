//! The supervisor daemon and the commands that talk to it.
//!
//! `keepnet up` starts a daemon (a new session, logs in the runtime directory) that owns
//! every shared region and the TAP device, starts the servers, and answers requests on a
//! Unix socket in the runtime directory: status, the link region for a capture, down.
//!
//! The daemon records what it runs in a state file beside the socket ([`protocol::StateFile`]).
//! If it dies, the servers carry on; the next `keepnet up` re-adopts them from that file
//! (`daemon::adopt`: every fd comes back from the servers with pidfd_getfd(2)) instead of
//! starting a second constellation, and `keepnet down` without a supervisor ends them by pid.

pub mod apps;
pub mod client;
pub mod daemon;
pub mod demo;
pub mod instance;
pub mod lab;
pub mod procs;
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

/// The lock a running supervisor holds (flock) for its whole life: two `keepnet up` at
/// once never both start (or re-adopt) a constellation.
pub fn lock_path(instance: &str) -> PathBuf {
    run_dir(instance).join("supervisor.lock")
}

/// Takes the supervisor lock of `instance` (see [`lock_path`]) without waiting: None if
/// another process holds it.
pub fn try_lock(instance: &str) -> std::io::Result<Option<nix::fcntl::Flock<std::fs::File>>> {
    let path = lock_path(instance);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(Some(l)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(e.into()),
    }
}

/// The daemon's log file.
pub fn log_path(instance: &str) -> PathBuf {
    run_dir(instance).join("supervisor.log")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_supervisor_lock_per_instance() {
        let dir = std::env::temp_dir().join(format!("kn-lock-{}", std::process::id()));
        std::env::set_var("KEEPNET_RUN_DIR", &dir);
        let first = try_lock("locktest").expect("lock").expect("free at first");
        assert!(try_lock("locktest").expect("lock").is_none(), "taken twice");
        drop(first);
        assert!(
            try_lock("locktest").expect("lock").is_some(),
            "not released"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
