//! Processes as the supervisor sees them: its own children, and servers, services and
//! applications it re-adopted after a supervisor before it died (watched through pidfds,
//! identified through /proc, their fds fetched with pidfd_getfd(2)).

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::{Child, ExitStatus};

use nix::sys::signal::Signal;

/// How the supervisor describes the end of a process it cannot wait for.
pub const STATUS_UNKNOWN: &str = "exited (status unknown: not a child of this supervisor)";

/// A server or service process: a child of this supervisor, or one it re-adopted (a child
/// of a supervisor that died; its exit is seen through its pidfd, its status is unknown).
#[derive(Debug)]
pub enum Proc {
    Child(Child),
    Adopted { pid: u32 },
}

impl Proc {
    /// Its pid.
    pub fn id(&self) -> u32 {
        match self {
            Proc::Child(c) => c.id(),
            Proc::Adopted { pid } => *pid,
        }
    }

    /// Whether it has exited, without blocking: `Some(Some(status))` for a child that was
    /// reaped now, `Some(None)` for an adopted process whose pidfd says it is gone, `None`
    /// while it runs.
    pub fn try_exit(&mut self, pidfd: Option<&OwnedFd>) -> Option<Option<ExitStatus>> {
        match self {
            Proc::Child(c) => c.try_wait().ok().flatten().map(Some),
            Proc::Adopted { .. } => pidfd.is_some_and(pidfd_exited).then_some(None),
        }
    }

    /// True for a process this supervisor did not start.
    pub fn adopted(&self) -> bool {
        matches!(self, Proc::Adopted { .. })
    }
}

/// Waits up to `limit` for our child to exit, then kills it; reaps it either way.
pub fn reap_within(child: &mut Child, limit: std::time::Duration) {
    let end = std::time::Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return,
            Ok(None) if std::time::Instant::now() < end => {
                std::thread::sleep(std::time::Duration::from_millis(5))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
        }
    }
}

fn raw_pid(pid: u32) -> std::io::Result<libc::pid_t> {
    libc::pid_t::try_from(pid)
        .ok()
        .filter(|&p| p > 0)
        .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))
}

/// Wraps an fd number a syscall just returned (negative: the error in errno).
#[allow(unsafe_code)]
fn owned_from_syscall(ret: libc::c_long) -> std::io::Result<OwnedFd> {
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd =
        RawFd::try_from(ret).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidData))?;
    // SAFETY: the kernel just returned this fd to us and nothing else refers to it, so the
    // OwnedFd is its only owner.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A pidfd for process `pid` (pidfd_open(2)): it becomes readable when the process exits.
/// Any process may be watched this way, a child or not.
#[allow(unsafe_code)]
pub fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    let pid = raw_pid(pid)?;
    // SAFETY: pidfd_open takes a pid and a flags word, both plain integers; it touches none of
    // our memory and returns a new fd (close-on-exec) or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0 as libc::c_uint) };
    owned_from_syscall(fd)
}

/// True if `fd` (a pidfd) is readable now: its process has exited.
pub fn pidfd_exited(fd: &OwnedFd) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout};
    let mut p = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    matches!(nix::poll::poll(&mut p, PollTimeout::ZERO), Ok(n) if n > 0)
}

/// Waits at most `limit` for the process behind pidfd `fd` to exit; true if it did.
pub fn pidfd_wait(fd: &OwnedFd, limit: std::time::Duration) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout};
    let end = std::time::Instant::now() + limit;
    loop {
        let left = end.saturating_duration_since(std::time::Instant::now());
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let mut p = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        match nix::poll::poll(&mut p, PollTimeout::from(ms)) {
            Ok(n) if n > 0 => return true,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return false,
            Ok(_) if left.is_zero() => return false,
            Ok(_) => {}
        }
    }
}

/// A duplicate of fd `target` of the process behind `pidfd` (pidfd_getfd(2)), close-on-exec.
/// Needs ptrace access to that process: root, or the same user where
/// kernel.yama.ptrace_scope is 0.
#[allow(unsafe_code)]
pub fn pidfd_getfd(pidfd: BorrowedFd<'_>, target: RawFd) -> std::io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    // SAFETY: pidfd_getfd takes two fd numbers and a flags word, all plain integers; it
    // touches none of our memory and returns a new fd (close-on-exec) or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_pidfd_getfd,
            pidfd.as_raw_fd(),
            target,
            0 as libc::c_uint,
        )
    };
    owned_from_syscall(fd)
}

/// Sends `sig` to the process behind `pidfd` (pidfd_send_signal(2)): never to a process that
/// reused its pid.
#[allow(unsafe_code)]
pub fn pidfd_send_signal(pidfd: BorrowedFd<'_>, sig: Signal) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: pidfd_send_signal takes an fd, a signal number, a null siginfo pointer (the
    // kernel then fills in a plain kill's) and a flags word; it touches none of our memory.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig as libc::c_int,
            std::ptr::null::<libc::siginfo_t>(),
            0 as libc::c_uint,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The fields of /proc/PID/stat after the command name: index 0 is field 3 (state).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold anything, parentheses included.
    let rest = &text[text.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// The start time of process `pid` (field 22 of /proc/PID/stat, clock ticks after boot):
/// with the pid, it names one process (a reused pid has another start time).
pub fn start_time(pid: u32) -> Option<u64> {
    if pid == 0 {
        return None;
    }
    stat_fields(pid)?.get(22 - 3)?.parse().ok()
}

/// True if process `pid` exists, is not a zombie, and (where `start` is not 0) started at
/// `start`.
pub fn alive_as(pid: u32, start: u64) -> bool {
    if pid == 0 {
        return false;
    }
    let Some(f) = stat_fields(pid) else {
        return false;
    };
    let state_ok = f.first().is_some_and(|s| s != "Z" && s != "X" && s != "x");
    let start_ok = start == 0 || f.get(22 - 3).and_then(|s| s.parse::<u64>().ok()) == Some(start);
    state_ok && start_ok
}

/// True if process `pid` (started at `start`, unless 0) is still in the process table, as a
/// zombie not yet reaped too.
pub fn exists_as(pid: u32, start: u64) -> bool {
    if pid == 0 {
        return false;
    }
    match stat_fields(pid) {
        None => false,
        Some(f) => start == 0 || f.get(22 - 3).and_then(|s| s.parse::<u64>().ok()) == Some(start),
    }
}

/// How long ago process `pid` started (None where /proc does not say).
pub fn age(pid: u32) -> Option<std::time::Duration> {
    let ticks = start_time(pid)?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|&h| h > 0)? as f64;
    let up: f64 = std::fs::read_to_string("/proc/uptime")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let ago = up - ticks as f64 / hz;
    (ago.is_finite() && ago >= 0.0).then(|| std::time::Duration::from_secs_f64(ago))
}

/// The executable of process `pid` (a binary replaced on disk since keeps its path).
pub fn exe(pid: u32) -> Option<PathBuf> {
    let p = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let s = p.to_string_lossy();
    Some(match s.strip_suffix(" (deleted)") {
        Some(kept) => PathBuf::from(kept),
        None => p,
    })
}

/// The environment process `pid` was started with.
pub fn environ(pid: u32) -> std::io::Result<BTreeMap<String, String>> {
    let raw = std::fs::read(format!("/proc/{pid}/environ"))?;
    Ok(raw
        .split(|&b| b == 0)
        .filter_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            let (k, v) = kv.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect())
}

/// Process `pid`'s open fds and what each one is (readlink of /proc/PID/fd/N:
/// `/memfd:NAME (deleted)`, `anon_inode:[eventfd]`, `socket:[INODE]`, a path).
pub fn fd_links(pid: u32) -> std::io::Result<BTreeMap<RawFd, String>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(entry) = entry else { continue };
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<RawFd>().ok())
        else {
            continue;
        };
        if let Ok(target) = std::fs::read_link(entry.path()) {
            out.insert(fd, target.to_string_lossy().into_owned());
        }
    }
    Ok(out)
}

/// What one of our own fds is (see [`fd_links`]).
pub fn own_fd_link(fd: BorrowedFd<'_>) -> String {
    use std::os::fd::AsRawFd;
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The memfd name in a /proc fd link (`/memfd:NAME (deleted)` gives `NAME`).
pub fn memfd_name(link: &str) -> Option<&str> {
    let name = link.strip_prefix("/memfd:")?;
    Some(name.strip_suffix(" (deleted)").unwrap_or(name))
}

/// Ends process `pid` if it still is the one that started at `start`: SIGTERM, then SIGKILL
/// after `grace`. Through a pidfd, so a reused pid is never signalled. Returns true if it
/// was running.
pub fn end_process(pid: u32, start: u64, grace: std::time::Duration) -> bool {
    let Ok(fd) = pidfd_open(pid) else {
        return false;
    };
    // Checked after the pidfd is held: the pidfd names this very process from now on.
    if !alive_as(pid, start) {
        return false;
    }
    let _ = pidfd_send_signal(fd.as_fd(), Signal::SIGTERM);
    if !pidfd_wait(&fd, grace) {
        let _ = pidfd_send_signal(fd.as_fd(), Signal::SIGKILL);
        pidfd_wait(&fd, std::time::Duration::from_secs(2));
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_is_known_by_its_pid_and_start_time() {
        let me = std::process::id();
        let start = start_time(me).expect("start time of this process");
        assert!(alive_as(me, start));
        assert!(alive_as(me, 0));
        assert!(
            !alive_as(me, start + 1),
            "another start time is another process"
        );
        assert!(!alive_as(0, 0));
        assert!(age(me).is_some());
        assert!(exe(me).is_some());
        let env = environ(me).expect("environ");
        assert!(!env.is_empty());
        let fds = fd_links(me).expect("fd links");
        assert!(!fds.is_empty());
        assert_eq!(
            memfd_name("/memfd:keepnet-x-link (deleted)"),
            Some("keepnet-x-link")
        );
        assert_eq!(memfd_name("socket:[1234]"), None);
    }

    #[test]
    fn a_child_fd_is_fetched_and_a_child_signalled_through_its_pidfd() {
        let child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .expect("spawn sleep");
        let fd = pidfd_open(child.id()).expect("pidfd_open");
        // Its stdin is ours (inherited): fetching fd 0 works for a process of our own user.
        let got = pidfd_getfd(fd.as_fd(), 0).expect("pidfd_getfd");
        assert!(!own_fd_link(got.as_fd()).is_empty());
        assert!(!pidfd_exited(&fd));
        pidfd_send_signal(fd.as_fd(), Signal::SIGKILL).expect("pidfd_send_signal");
        assert!(pidfd_wait(&fd, std::time::Duration::from_secs(5)));
        let mut p = Proc::Child(child);
        // A child is reaped through wait, with its status.
        let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let st = loop {
            if let Some(st) = p.try_exit(Some(&fd)) {
                break st;
            }
            assert!(std::time::Instant::now() < end);
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert!(st.is_some());
        if let Proc::Child(c) = &mut p {
            let _ = c.wait();
        }
    }
}
