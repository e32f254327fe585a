//! The peer process: spawning it (parent side, with a guard that kills and reaps it and a
//! watchdog that ends a phase that overruns) and running it (the hidden `__bench-peer`
//! subcommand).

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::{getpid, getppid, Pid};

use super::control::{CtlMsg, CtlReader, CtlWriter};
use super::link::Phase;
use super::{transports, Placement, Transport};
use crate::bench::affinity;
use crate::bench::fds::{HandOff, Inherited};
use crate::error::{chain, Context, Error, Result};

/// How long the peer may take to start and report ready, or to report a phase's result once
/// the parent has sent the end marker.
const CTL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the peer may take to exit after its last report.
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);

/// Arguments of the hidden peer subcommand (set by the parent, not by people).
#[derive(Clone, Debug, clap::Args)]
pub struct PeerArgs {
    #[arg(long, value_enum)]
    pub transport: Transport,
    #[arg(long, value_enum)]
    pub placement: Placement,
    /// CPU to pin the peer to.
    #[arg(long)]
    pub cpu: usize,
    /// The parent's pid: the peer exits at once if it is not its parent.
    #[arg(long)]
    pub parent_pid: i32,
}

/// What the peer reported at the end of a phase.
#[derive(Clone, Copy, Debug)]
pub struct PhaseDone {
    pub received: u64,
    pub errors: u64,
    pub end_ns: u64,
}

/// A running peer. Dropping it kills (SIGKILL, by pid) and reaps the process if it is still
/// there; [`Peer::finish`] is the orderly end.
#[derive(Debug)]
pub struct Peer {
    child: Option<Child>,
    ctl: CtlReader,
    watchdog: Watchdog,
}

impl Peer {
    /// Re-executes this binary as `keepnet __bench-peer`, handing it `handoff`'s fds (plus
    /// the control socket) by inheritance. `pokes` are fds (eventfds) the watchdog writes an
    /// end marker to when it fires, to wake a parent blocked reading them.
    pub fn spawn(
        transport: Transport,
        placement: Placement,
        cpu: usize,
        mut handoff: HandOff,
        pokes: Vec<OwnedFd>,
    ) -> Result<Peer> {
        let (ctl_parent, ctl_child) =
            UnixStream::pair().context("creating the control socket pair")?;
        handoff.add("ctl", ctl_child);
        let exe = std::env::current_exe().context("finding keepnet's own executable")?;
        let mut cmd = Command::new(&exe);
        cmd.arg("__bench-peer")
            .arg("--transport")
            .arg(transport.name())
            .arg("--placement")
            .arg(placement.name())
            .arg("--cpu")
            .arg(cpu.to_string())
            .arg("--parent-pid")
            .arg(getpid().as_raw().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        handoff.apply(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting the peer process {}", exe.display()))?;
        // Close our copies of the peer's ends now, so that its death shows as EOF here.
        drop(handoff);
        let pid = Pid::from_raw(child.id() as i32);
        tracing::debug!(%pid, ?transport, ?placement, "peer started");
        Ok(Peer {
            child: Some(child),
            ctl: CtlReader::new(ctl_parent),
            watchdog: Watchdog::start(pid, pokes),
        })
    }

    /// Waits for the peer to report that it is ready for `phase`.
    pub fn ready(&mut self, phase: Phase) -> Result<()> {
        match self.ctl.recv(CTL_TIMEOUT)? {
            CtlMsg::Ready { phase: p } if p == phase => Ok(()),
            other => Err(Error::Protocol(format!(
                "expected the peer to be ready for {phase:?}, it said {other:?}"
            ))),
        }
    }

    /// Waits for the peer's result of `phase`.
    pub fn done(&mut self, phase: Phase) -> Result<PhaseDone> {
        match self.ctl.recv(CTL_TIMEOUT)? {
            CtlMsg::Done {
                phase: p,
                received,
                errors,
                end_ns,
            } if p == phase => Ok(PhaseDone {
                received,
                errors,
                end_ns,
            }),
            other => Err(Error::Protocol(format!(
                "expected the peer's result of {phase:?}, it said {other:?}"
            ))),
        }
    }

    /// Kills the peer if the current phase is still running at `deadline`.
    pub fn arm(&self, deadline: Instant) {
        self.watchdog.set(Some(deadline));
    }

    pub fn disarm(&self) {
        self.watchdog.set(None);
    }

    /// Whether the watchdog killed the peer.
    pub fn watchdog_fired(&self) -> bool {
        self.watchdog.fired()
    }

    /// Waits for the peer to exit on its own (it does after its last phase) and checks how.
    pub fn finish(mut self) -> Result<()> {
        self.watchdog.stop();
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            match child.try_wait().context("waiting for the peer")? {
                Some(status) if status.success() => return Ok(()),
                Some(status) => return Err(Error::Peer(format!("the peer exited with {status}"))),
                None if Instant::now() >= deadline => {
                    reap(&mut child);
                    return Err(Error::Timeout(format!(
                        "the peer did not exit within {EXIT_TIMEOUT:?} of its last report; killed it"
                    )));
                }
                None => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.watchdog.stop();
        if let Some(mut child) = self.child.take() {
            reap(&mut child);
        }
    }
}

/// SIGKILL by pid (the child is not reaped yet, so the pid is still ours), then wait.
fn reap(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
    }
    if let Err(e) = child.wait() {
        tracing::warn!("could not reap the peer {}: {e}", child.id());
    }
}

#[derive(Debug, Default)]
struct WatchState {
    deadline: Option<Instant>,
    stop: bool,
    fired: bool,
}

#[derive(Debug, Default)]
struct WatchShared {
    state: Mutex<WatchState>,
    cv: Condvar,
}

impl WatchShared {
    fn lock(&self) -> MutexGuard<'_, WatchState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A thread that SIGKILLs the peer when an armed deadline passes. Killing the peer ends
/// every blocking wait of the parent: pipes and sockets see EOF, eventfds get poked, and
/// spinning waits have their own time limit.
#[derive(Debug)]
struct Watchdog {
    shared: Arc<WatchShared>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    fn start(pid: Pid, pokes: Vec<OwnedFd>) -> Watchdog {
        let shared = Arc::new(WatchShared::default());
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("bench-watchdog".into())
            .spawn(move || watch(&s, pid, pokes));
        let thread = match thread {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!(
                    "no watchdog thread ({e}); overrunning phases rely on their own limits"
                );
                None
            }
        };
        Watchdog { shared, thread }
    }

    fn set(&self, deadline: Option<Instant>) {
        self.shared.lock().deadline = deadline;
        self.shared.cv.notify_all();
    }

    fn fired(&self) -> bool {
        self.shared.lock().fired
    }

    fn stop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn watch(s: &WatchShared, pid: Pid, pokes: Vec<OwnedFd>) {
    let mut st = s.lock();
    loop {
        if st.stop {
            return;
        }
        match st.deadline {
            None => st = s.cv.wait(st).unwrap_or_else(|p| p.into_inner()),
            Some(d) => {
                let now = Instant::now();
                if now >= d {
                    break;
                }
                st =
                    s.cv.wait_timeout(st, d - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
            }
        }
    }
    st.fired = true;
    drop(st);
    tracing::warn!(%pid, "a benchmark phase overran its time limit: killing the peer");
    let _ = kill(pid, Signal::SIGKILL);
    for fd in pokes {
        let _ = nix::unistd::write(&fd, &transports::eventfd::END_BIAS.to_ne_bytes());
    }
}

/// Entry point of `keepnet __bench-peer`.
pub fn run_peer(args: PeerArgs) -> Result<()> {
    // Die with the parent, and make sure the parent we were started for is still there (it
    // could have died before the prctl).
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).context("prctl(PR_SET_PDEATHSIG)")?;
    if getppid() != Pid::from_raw(args.parent_pid) {
        return Err(Error::Peer(format!(
            "parent {} is gone (or this was not started by keepnet bench)",
            args.parent_pid
        )));
    }
    let mut fds = Inherited::from_env()?;
    let mut ctl = CtlWriter::new(UnixStream::from(fds.take("ctl")?));
    let result =
        affinity::pin_to(args.cpu).and_then(|()| transports::run_child(&args, &mut fds, &mut ctl));
    if let Err(e) = &result {
        let _ = ctl.send(&CtlMsg::Failed { error: chain(e) });
    }
    result
}
