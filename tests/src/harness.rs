//! Process harness for the cross-process suites: spawn peers with inherited regions, kill and
//! reap them by pid (also on panic), watchdogs so a test fails instead of hanging, a lock that
//! serialises heavy tests across test threads and test processes, and a seeded RNG.

use std::fs::{File, OpenOptions};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use keepnet_ipc::fdpass::inherit_fds;
use keepnet_ipc::Region;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::shm::{ENV_FDS, ENV_PARENT, ENV_TIMEOUT};

/// Pids of peers alive right now, for the watchdog's last resort.
static LIVE: Mutex<Vec<u32>> = Mutex::new(Vec::new());

fn live() -> std::sync::MutexGuard<'static, Vec<u32>> {
    LIVE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Describes an exit status for messages.
pub fn describe(st: &ExitStatus) -> String {
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => format!("{st:?}"),
    }
}

/// A spawned peer process. Dropping it kills it with SIGKILL and reaps it, by pid, so no test
/// leaves a process behind, also when it panics.
#[derive(Debug)]
pub struct Peer {
    child: Child,
    name: String,
    status: Option<ExitStatus>,
}

impl Peer {
    /// Spawns `bin args...` with `regions` inherited at their fd numbers (listed in
    /// [`ENV_FDS`]), the peer's own deadline set to `timeout`.
    pub fn spawn(bin: &str, args: &[&str], regions: &[&Region], timeout: Duration) -> Peer {
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .stdin(Stdio::null())
            .env(ENV_PARENT, std::process::id().to_string())
            .env(ENV_TIMEOUT, timeout.as_secs().max(1).to_string());
        let fds: Vec<_> = regions.iter().map(|r| r.fd()).collect();
        let list: Vec<String> = fds
            .iter()
            .map(|f| std::os::fd::AsRawFd::as_raw_fd(f).to_string())
            .collect();
        cmd.env(ENV_FDS, list.join(","));
        inherit_fds(&mut cmd, &fds);
        let mut reg = live();
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => panic!("spawning {bin} {args:?}: {e}"),
        };
        reg.push(child.id());
        Peer {
            name: format!(
                "{} (pid {})",
                args.first().copied().unwrap_or("peer"),
                child.id()
            ),
            child,
            status: None,
        }
    }

    /// Spawns a peer that inherits nothing (it must get what it needs some other way).
    pub fn spawn_plain(bin: &str, args: &[&str], timeout: Duration) -> Peer {
        Peer::spawn(bin, args, &[], timeout)
    }

    /// The peer's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Name and pid, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sends `sig` to the peer (by pid; it is not reaped yet, so the pid is still its own).
    pub fn signal(&mut self, sig: Signal) {
        if self.try_status().is_none() {
            if let Err(e) = kill(Pid::from_raw(self.child.id() as i32), sig) {
                panic!("kill -{sig} {}: {e}", self.name);
            }
        }
    }

    /// Its exit status if it has exited (reaping it), without blocking.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            match self.child.try_wait() {
                Ok(Some(st)) => {
                    self.forget();
                    self.status = Some(st);
                }
                Ok(None) => {}
                Err(e) => panic!("waitpid on {}: {e}", self.name),
            }
        }
        self.status
    }

    /// Waits for the peer to exit, at most until `deadline`.
    pub fn wait_until(&mut self, deadline: Instant) -> Result<ExitStatus, String> {
        loop {
            if let Some(st) = self.try_status() {
                return Ok(st);
            }
            if Instant::now() >= deadline {
                return Err(format!("{} still running at the deadline", self.name));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Kills the peer with SIGKILL and reaps it; returns how it ended (it may have exited on its
    /// own just before).
    pub fn kill_and_reap(&mut self) -> ExitStatus {
        if let Some(st) = self.status {
            return st;
        }
        self.forget();
        // Child::kill sends SIGKILL to our (not yet reaped, so not reusable) pid.
        if let Err(e) = self.child.kill() {
            panic!("kill {}: {e}", self.name);
        }
        match self.child.wait() {
            Ok(st) => {
                self.status = Some(st);
                st
            }
            Err(e) => panic!("waitpid on {}: {e}", self.name),
        }
    }

    fn forget(&self) {
        let pid = self.child.id();
        live().retain(|&p| p != pid);
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if self.status.is_none() {
            self.forget();
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Waits for all `peers` to exit by `deadline`. Fails early, naming the peer, as soon as one of
/// them ends other than with exit code 0, and fails at the deadline.
pub fn wait_all_ok(peers: &mut [&mut Peer], deadline: Instant) -> Result<(), String> {
    wait_all_ok_progress(peers, deadline, Duration::MAX, || 0)
}

/// As [`wait_all_ok`], and also fails as soon as `progress` (any value that changes while the
/// peers get work done, e.g. a sum of shared counters) has not changed for `stall`.
pub fn wait_all_ok_progress(
    peers: &mut [&mut Peer],
    deadline: Instant,
    stall: Duration,
    mut progress: impl FnMut() -> u64,
) -> Result<(), String> {
    let mut last = progress();
    let mut last_change = Instant::now();
    loop {
        let mut running = Vec::new();
        for p in peers.iter_mut() {
            match p.try_status() {
                Some(st) if st.success() => {}
                Some(st) => return Err(format!("{} failed: {}", p.name(), describe(&st))),
                None => running.push(p.name().to_string()),
            }
        }
        if running.is_empty() {
            return Ok(());
        }
        let now = Instant::now();
        let seen = progress();
        if seen != last {
            (last, last_change) = (seen, now);
        } else if now.duration_since(last_change) >= stall {
            return Err(format!(
                "no progress for {stall:?} (progress mark {seen}) with peers still running: {running:?}"
            ));
        }
        if now >= deadline {
            return Err(format!(
                "deadline passed with peers still running: {running:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A last-resort watchdog: if the test has not dropped it within `limit`, it prints which test
/// hung, kills every live peer and aborts the test process, so the run fails instead of hanging.
/// (Tests also bound every wait themselves and fail cleanly long before this fires.)
#[derive(Debug)]
pub struct Watchdog {
    tx: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    pub fn arm(name: &str, limit: Duration) -> Watchdog {
        let (tx, rx) = mpsc::channel::<()>();
        let name = name.to_string();
        let thread = std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                eprintln!("WATCHDOG: test {name} still running after {limit:?}; killing its peers and aborting");
                for &pid in live().iter() {
                    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                }
                std::process::abort();
            }
        });
        Watchdog {
            tx: Some(tx),
            thread: Some(thread),
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Held while a heavy test runs: an exclusive flock on a file in the temp dir, so heavy tests
/// run one at a time across test threads and test processes (cargo test or nextest).
#[derive(Debug)]
pub struct HeavyLock {
    _lock: Flock<File>,
}

/// Takes the heavy-test lock, waiting at most `limit`.
pub fn heavy_lock(limit: Duration) -> HeavyLock {
    let path = std::env::temp_dir().join("keepnet-tests-heavy.lock");
    let deadline = Instant::now() + limit;
    let mut file = match OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) => panic!("opening {}: {e}", path.display()),
    };
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => return HeavyLock { _lock: l },
            Err((f, _)) => file = f,
        }
        if Instant::now() >= deadline {
            panic!(
                "waited {limit:?} for the heavy-test lock {}",
                path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A xorshift64* generator: small, seeded, reproducible.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(crate::shm::mix(seed) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform-ish in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// The seed for a randomised test: `KEEPNET_TEST_SEED` if set, else from the clock. Printed so
/// a failing run can be replayed.
pub fn seed(test: &str) -> u64 {
    let s = match std::env::var("KEEPNET_TEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(s) => s,
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    };
    println!("{test}: seed {s} (replay with KEEPNET_TEST_SEED={s})");
    s
}

/// Kills supervisor `pid` with SIGKILL and waits (at most 10 s) until it has exited.
pub fn kill_supervisor_and_wait(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap_or_else(|e| panic!("kill -9 the supervisor (pid {pid}): {e}"));
    let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !exited(pid) {
        assert!(
            std::time::Instant::now() < end,
            "supervisor {pid} alive after SIGKILL"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// True if process `pid` has exited (gone, or a zombie nobody reaped yet).
pub fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rfind(')')
            .and_then(|i| s.get(i + 1..))
            .and_then(|r| r.split_whitespace().next())
            .is_some_and(|st| st == "Z" || st == "X"),
    }
}
