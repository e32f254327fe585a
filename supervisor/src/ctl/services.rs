//! Services: applications listed in the config that the supervisor starts once the servers
//! are ready and restarts when they exit. They are ordinary programs on the sockets library:
//! they attach through the control socket like any other application.
//!
//! A service started by a supervisor that died is re-adopted by the next one
//! ([`ServiceProc::adopt`]): watched through a pidfd (its exit status is unknown, it is not
//! this supervisor's child) and restarted as usual when it exits.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::procs::{self, Proc};
use crate::config::ServiceConfig;

/// Shortest time between two starts of one service (a crash loop costs at most this).
const RESTART_DELAY: Duration = Duration::from_millis(500);

/// One service.
pub struct ServiceProc {
    pub cfg: ServiceConfig,
    pub binary: PathBuf,
    pub child: Option<Proc>,
    /// A pidfd on the running process: readable once it exited (polled by the serve loop;
    /// the only way to see a re-adopted service exit).
    pub pidfd: Option<OwnedFd>,
    /// Its start time (field 22 of /proc/PID/stat), for the state file.
    pub start: u64,
    pub restarts: u64,
    pub started: Instant,
    /// When a service that exited may start again.
    pub next_start: Option<Instant>,
    /// Last exit, as text.
    pub last_exit: Option<String>,
    /// Whether it attached and bound a socket since its last start.
    pub ready: bool,
}

/// The binary a service runs: its own, or `keepnet-service` beside `keepnet`.
pub fn service_binary(cfg: &ServiceConfig) -> PathBuf {
    cfg.binary.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or_else(|| PathBuf::from("."))
            .join("keepnet-service")
    })
}

impl ServiceProc {
    pub fn new(cfg: ServiceConfig) -> ServiceProc {
        ServiceProc {
            binary: service_binary(&cfg),
            cfg,
            child: None,
            pidfd: None,
            start: 0,
            restarts: 0,
            started: Instant::now(),
            next_start: None,
            last_exit: None,
            ready: false,
        }
    }

    /// Starts it, logging to `log`, attached to `instance`.
    pub fn spawn(&mut self, instance: &str, log: &Path) -> std::io::Result<()> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let err = out.try_clone()?;
        let mut cmd = Command::new(&self.binary);
        cmd.args(&self.cfg.args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .env(keepnet_server::app::INSTANCE_ENV, instance)
            .env(
                "KEEPNET_LOG",
                self.cfg.log.clone().unwrap_or_else(|| "info".into()),
            );
        let child = cmd.spawn()?;
        info!(service = %self.cfg.name, pid = child.id(), "service started");
        self.pidfd = procs::pidfd_open(child.id()).ok();
        self.start = procs::start_time(child.id()).unwrap_or(0);
        self.child = Some(Proc::Child(child));
        self.started = Instant::now();
        self.next_start = None;
        self.ready = false;
        Ok(())
    }

    /// Takes over process `pid` (started at `start`) as this service's running instance: a
    /// service a supervisor that died had started. False if it is not running (any more).
    pub fn adopt(&mut self, pid: u32, start: u64) -> bool {
        let Ok(fd) = procs::pidfd_open(pid) else {
            return false;
        };
        // Checked with the pidfd held: from now on it names this very process.
        if start == 0 || !procs::alive_as(pid, start) {
            return false;
        }
        self.child = Some(Proc::Adopted { pid });
        self.pidfd = Some(fd);
        self.start = start;
        self.started = procs::age(pid).map_or_else(Instant::now, |a| {
            Instant::now().checked_sub(a).unwrap_or_else(Instant::now)
        });
        self.next_start = None;
        info!(service = %self.cfg.name, pid, "service re-adopted");
        true
    }

    /// The pid while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Proc::id)
    }

    /// Reaps it if it exited; schedules the restart. Returns true if it exited now.
    pub fn reap(&mut self) -> bool {
        let Some(child) = self.child.as_mut() else {
            return false;
        };
        let Some(status) = child.try_exit(self.pidfd.as_ref()) else {
            return false;
        };
        let status = status.map_or_else(|| procs::STATUS_UNKNOWN.to_string(), |s| s.to_string());
        warn!(service = %self.cfg.name, %status, "service exited; restarting");
        self.child = None;
        self.pidfd = None;
        self.start = 0;
        self.last_exit = Some(status);
        self.ready = false;
        let since = self.started.elapsed();
        self.next_start = Some(Instant::now() + RESTART_DELAY.saturating_sub(since));
        true
    }

    /// Starts it again if it is due. Returns true if it started.
    pub fn restart_if_due(&mut self, instance: &str, log: &Path) -> bool {
        if self.next_start.is_some_and(|t| Instant::now() >= t) {
            self.restarts += 1;
            if let Err(e) = self.spawn(instance, log) {
                warn!(service = %self.cfg.name, %e, "service could not start; retrying");
                self.next_start = Some(Instant::now() + RESTART_DELAY);
                return false;
            }
            return true;
        }
        false
    }

    /// Schedules a start now (a service whose process was gone when it was re-adopted).
    pub fn start_soon(&mut self) {
        self.next_start = Some(Instant::now());
    }

    /// Stops it: SIGTERM, then SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        let Some(child) = self.child.take() else {
            return;
        };
        let pidfd = self.pidfd.take();
        match child {
            Proc::Child(mut child) => {
                let pid = nix::unistd::Pid::from_raw(child.id() as i32);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
                procs::reap_within(&mut child, grace);
            }
            Proc::Adopted { .. } => {
                // Not our child: signalled through its pidfd (never a reused pid), seen gone
                // when the pidfd turns readable.
                if let Some(fd) = pidfd {
                    use nix::sys::signal::Signal;
                    let _ = procs::pidfd_send_signal(fd.as_fd(), Signal::SIGTERM);
                    if !procs::pidfd_wait(&fd, grace) {
                        let _ = procs::pidfd_send_signal(fd.as_fd(), Signal::SIGKILL);
                        procs::pidfd_wait(&fd, Duration::from_secs(2));
                    }
                }
            }
        }
        info!(service = %self.cfg.name, "service stopped");
    }
}
