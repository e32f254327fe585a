//! Services: applications listed in the config that the supervisor starts once the servers
//! are ready and restarts when they exit. They are ordinary programs on the sockets library:
//! they attach through the control socket like any other application.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::config::ServiceConfig;

/// Shortest time between two starts of one service (a crash loop costs at most this).
const RESTART_DELAY: Duration = Duration::from_millis(500);

/// One service.
pub struct ServiceProc {
    pub cfg: ServiceConfig,
    pub binary: PathBuf,
    pub child: Option<Child>,
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
        self.child = Some(child);
        self.started = Instant::now();
        self.next_start = None;
        self.ready = false;
        Ok(())
    }

    /// The pid while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Reaps it if it exited; schedules the restart. Returns true if it exited now.
    pub fn reap(&mut self) -> bool {
        let Some(child) = self.child.as_mut() else {
            return false;
        };
        let Ok(Some(status)) = child.try_wait() else {
            return false;
        };
        warn!(service = %self.cfg.name, %status, "service exited; restarting");
        self.child = None;
        self.last_exit = Some(status.to_string());
        self.ready = false;
        let since = self.started.elapsed();
        self.next_start = Some(Instant::now() + RESTART_DELAY.saturating_sub(since));
        true
    }

    /// Starts it again if it is due.
    pub fn restart_if_due(&mut self, instance: &str, log: &Path) {
        if self.next_start.is_some_and(|t| Instant::now() >= t) {
            self.restarts += 1;
            if let Err(e) = self.spawn(instance, log) {
                warn!(service = %self.cfg.name, %e, "service could not start; retrying");
                self.next_start = Some(Instant::now() + RESTART_DELAY);
            }
        }
    }

    /// Stops it: SIGTERM, then SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let end = Instant::now() + grace;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(5)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
            }
        }
        info!(service = %self.cfg.name, "service stopped");
    }
}
