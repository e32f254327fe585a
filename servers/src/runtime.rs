//! The main loop every server runs.

use std::process::ExitCode;
use std::time::Duration;

use keepnet_ipc::{Ring, RingError, SpinPolicy, WaitOutcome};
use tracing::{error, info, info_span, warn};

use crate::boot::Boot;
use crate::control::{
    monotonic_ns, Command, ControlBlock, ControlError, ControlMsg, Handover, ServerState,
};

/// The build version servers report (`KEEPNET_BUILD_VERSION` at build time, else the crate
/// version).
pub const BUILD_VERSION: &str = match option_env!("KEEPNET_BUILD_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

/// Work done by one poll: items processed (frames, segments, datagrams...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Progress(pub u64);

impl Progress {
    /// Nothing to do.
    pub const IDLE: Progress = Progress(0);
}

/// Why a server stopped or refused a request.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("fatal: {0}")]
    Fatal(String),
    #[error("snapshot failed: {0}")]
    Snapshot(String),
    #[error("restore refused: {0}")]
    Restore(String),
    #[error("control ring: {0}")]
    Ring(#[from] RingError),
    #[error("control block: {0}")]
    Control(#[from] ControlError),
    #[error("boot: {0}")]
    Boot(#[from] crate::boot::BootError),
}

/// A server: polled one batch at a time by [`run`].
pub trait Server {
    /// The snapshot formats this build reads, oldest to newest; it writes the newest. `--version`
    /// prints them, so a supervisor can check a binary before a live update hands it a
    /// snapshot (a server without private state keeps the default).
    const STATE_FORMATS: (u32, u32) = (1, 1);

    /// The snapshot formats this process reads and writes: [`Server::STATE_FORMATS`] unless
    /// the build selects another at start (the udp server's format-2 variant does).
    fn state_formats() -> (u32, u32)
    where
        Self: Sized,
    {
        Self::STATE_FORMATS
    }

    /// Whether the server takes applications on a hotplug socket ([`Server::hotplug`]): a
    /// successor that takes over at a live update reads it before its first poll, where the
    /// supervisor queued the live applications for it.
    const HOTPLUG: bool = false;

    /// Processes one batch of work (bounded: a few dozen items) and says how much was done.
    /// Returning an error stops the server with a non-zero exit (the supervisor restarts it).
    fn poll(&mut self) -> Result<Progress, ServerError>;

    /// Cheap check, without side effects beyond refreshing cached ring indices, of whether
    /// [`Server::poll`] would find work. Used to re-check before parking.
    fn has_work(&mut self) -> bool;

    /// An fd whose readability is also work (the driver's TAP device): while idle, the loop
    /// parks until the doorbell rings or this fd is readable. The server's doorbell must then
    /// carry an eventfd (the supervisor hands it over as fd `bell`).
    fn wait_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }

    /// How long the loop may park before a timer of the server is due (the tcp server's
    /// retransmission and delayed-ACK timers); `None`: no timer, park the usual time.
    fn park_limit(&mut self) -> Option<Duration> {
        None
    }

    /// The supervisor queued messages on the server's hotplug socket (fd `hotplug`, see
    /// [`crate::app`]); read them. Returns how many were handled. Servers without one refuse.
    fn hotplug(&mut self) -> Result<u64, ServerError> {
        Err(ServerError::Fatal(
            "this server takes no hotplug messages".into(),
        ))
    }

    /// Serializes private state (called while quiesced, at a batch boundary). Use
    /// [`crate::codec::encode`].
    fn snapshot(&mut self) -> Result<Vec<u8>, ServerError> {
        Ok(Vec::new())
    }

    /// Restores private state written by a predecessor's [`Server::snapshot`]. Untrusted
    /// input: validate everything and apply nothing unless all of it is valid.
    fn restore(&mut self, _snapshot: &[u8]) -> Result<(), ServerError> {
        Ok(())
    }

    /// Fault injection (`keepnet kill SERVER --scribble`): publish garbage on every ring the
    /// server produces on (use [`Scribbler::fill`]); the runtime aborts the process right
    /// after. Returns how many slots were scribbled. Default: none (the server just aborts).
    fn scribble(&mut self, _garbage: &mut Scribbler) -> usize {
        0
    }
}

/// Garbage for [`Server::scribble`]: seeded from the clock and the pid, half of it random
/// bits, half of it plausible (small pool numbers and indices, lengths near real ones), so
/// consumers' validation is tried on both.
#[derive(Debug)]
pub struct Scribbler(u64);

impl Scribbler {
    /// Slots scribbled per ring at most.
    pub const PER_RING: usize = 64;

    /// A generator seeded from the clock and the pid.
    pub fn new() -> Scribbler {
        Scribbler((monotonic_ns() ^ (u64::from(std::process::id()) << 32)) | 1)
    }

    /// The next random value (xorshift64*).
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A garbage buffer descriptor.
    pub fn descriptor(&mut self) -> keepnet_ipc::Descriptor {
        let (a, b) = (self.next_u64(), self.next_u64());
        if a & 1 == 0 {
            keepnet_ipc::Descriptor {
                pool: a as u16,
                lease: (a >> 16) as u16,
                index: (a >> 32) as u32,
                offset: b as u32,
                len: (b >> 32) as u32,
            }
        } else {
            keepnet_ipc::Descriptor {
                pool: (a >> 8) as u16 % 6,
                lease: (a >> 16) as u16,
                index: (a >> 32) as u32 % 4096,
                offset: b as u32 % 20_000,
                len: (b >> 32) as u32 % 20_000,
            }
        }
    }

    /// A garbage datagram slot.
    pub fn datagram(&mut self) -> crate::wiring::DatagramSlot {
        let (a, b) = (self.next_u64(), self.next_u64());
        crate::wiring::DatagramSlot {
            desc: self.descriptor(),
            src: a as u32,
            dst: (a >> 32) as u32,
            protocol: b as u8,
            ttl: (b >> 8) as u8,
            kind: (b >> 16) as u8 % 4,
            icmp_type: (b >> 24) as u8,
            icmp_code: (b >> 32) as u8,
            broadcast: (b >> 40) as u8,
            _pad: [(b >> 48) as u8, (b >> 56) as u8],
            icmp_rest: a.rotate_left(7) as u32,
            header_len: (a >> 40) as u32 % 128,
        }
    }

    /// Fills up to [`Scribbler::PER_RING`] free slots of `ring` with `make`'s garbage and
    /// publishes them; returns how many.
    pub fn fill<T: keepnet_ipc::Pod>(
        &mut self,
        ring: &mut keepnet_ipc::Producer<T>,
        mut make: impl FnMut(&mut Scribbler) -> T,
    ) -> usize {
        let n = ring.free_slots().unwrap_or(0).min(Self::PER_RING);
        let items: Vec<T> = (0..n).map(|_| make(self)).collect();
        ring.push_slice(&items).unwrap_or(0)
    }
}

impl Default for Scribbler {
    fn default() -> Self {
        Scribbler::new()
    }
}

/// How the loop runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunOptions {
    /// Core to pin the process to.
    pub core: Option<usize>,
    /// Spin budget before parking: depends on placement (see DESIGN rule 6).
    pub spin: SpinPolicy,
    /// Longest park; the heartbeat advances at least this often while idle.
    pub park_timeout: Duration,
    /// Start in standby (a live-update successor): map regions, then wait for the supervisor's
    /// handover before building the server and claiming any ring.
    pub standby: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            core: None,
            spin: SpinPolicy::PARK_AT_ONCE,
            park_timeout: Duration::from_millis(50),
            standby: false,
        }
    }
}

fn pin(core: usize) -> bool {
    core_affinity::set_for_current(core_affinity::CoreId { id: core })
}

/// How [`run`] ended, short of a failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunEnd {
    /// The supervisor said stop.
    Stopped,
    /// A live update: the snapshot is written and standby process `successor` reserved. The
    /// caller drops the server (releasing every ring it claimed) and then hands over (see
    /// [`main`]).
    HandedOff { successor: u32 },
}

/// Runs `server` until the supervisor says stop or hand off (Ok) or the server fails (Err).
///
/// Each iteration: handle control messages; poll one batch unless quiesced; beat the
/// heartbeat; if there was no work, spin per `opts.spin` and park on the server's doorbell
/// (at most `opts.park_timeout`) until a producer or the supervisor rings it.
pub fn run<S: Server>(
    server: &mut S,
    control: &ControlBlock,
    opts: &RunOptions,
) -> Result<RunEnd, ServerError> {
    control.set_state(ServerState::Starting);
    control.set_pid(std::process::id());
    control.set_version(BUILD_VERSION);
    control.set_state_formats(S::state_formats());
    control.set_first_poll_ns(0);
    let pinned = opts.core.filter(|&c| pin(c));
    if let (Some(c), None) = (opts.core, pinned) {
        warn!(core = c, "could not pin to core; running unpinned");
    }
    control.set_core(pinned);
    let mut cmds = control.commands()?.consumer()?;
    let mut replies = control.replies()?.producer()?;
    let generation = control.generation().bump();
    control.reset_first_batch();
    control.set_state(ServerState::Running);
    info!(generation, core = ?pinned, spin = ?opts.spin, "serving");

    let bell = control.doorbell().clone();
    let mut running = true;
    let mut first_poll = true;
    loop {
        while let Some(msg) = cmds.pop()? {
            let Some(cmd) = msg.as_command() else {
                control.count_bad_command();
                warn!(kind = msg.kind, "unknown control message dropped");
                continue;
            };
            let (ok, value) = match cmd {
                Command::Quiesce => {
                    running = false;
                    control.set_state(ServerState::Quiesced);
                    info!("quiesced at a batch boundary");
                    (true, 0)
                }
                Command::Snapshot => match server.snapshot() {
                    Ok(bytes) => match control.write_snapshot(&bytes) {
                        Ok(()) => (true, bytes.len() as u64),
                        Err(e) => {
                            error!(%e, "snapshot does not fit");
                            (false, 1)
                        }
                    },
                    Err(e) => {
                        error!(%e, "snapshot failed");
                        (false, 2)
                    }
                },
                Command::Restore => match control
                    .read_snapshot()
                    .map_err(ServerError::from)
                    .and_then(|b| server.restore(&b))
                {
                    Ok(()) => {
                        info!("restored state from snapshot");
                        (true, 0)
                    }
                    Err(e) => {
                        error!(%e, "restore refused");
                        (false, 3)
                    }
                },
                Command::Resume => {
                    running = true;
                    control.reset_first_batch();
                    control.set_state(ServerState::Running);
                    info!("resumed");
                    (true, 0)
                }
                Command::Hotplug => match server.hotplug() {
                    Ok(n) => (true, n),
                    Err(e) => {
                        error!(%e, "hotplug failed");
                        (false, 4)
                    }
                },
                Command::Scribble => {
                    if msg.value != u64::from(std::process::id()) {
                        warn!(
                            meant_for = msg.value,
                            "scribble order for another instance ignored"
                        );
                        continue;
                    }
                    let n = server.scribble(&mut Scribbler::new());
                    error!(
                        slots = n,
                        "fault injection: scribbled garbage on my rings; aborting as ordered"
                    );
                    std::process::abort();
                }
                Command::Stop => {
                    reply(&mut replies, msg.seq, true, 0);
                    control.set_state(ServerState::Stopped);
                    info!("stopping on request");
                    return Ok(RunEnd::Stopped);
                }
                Command::Handoff => {
                    // At a batch boundary: the last poll is done, nothing is half-processed.
                    let stopped = monotonic_ns();
                    let successor = u32::try_from(msg.value).unwrap_or(0);
                    match handoff_snapshot(server, control, successor) {
                        Ok(len) => {
                            control.set_handoff_ns(stopped);
                            control.set_state(ServerState::Quiesced);
                            reply(&mut replies, msg.seq, true, len);
                            info!(
                                successor,
                                snapshot_bytes = len,
                                "live update: snapshot written; handing over"
                            );
                            return Ok(RunEnd::HandedOff { successor });
                        }
                        Err((code, why)) => {
                            error!(successor, reason = %why, "live update refused; serving on");
                            (false, code)
                        }
                    }
                }
            };
            reply(&mut replies, msg.seq, ok, value);
        }

        let done = if running {
            if first_poll {
                first_poll = false;
                control.set_first_poll_ns(monotonic_ns());
                let p = server.poll()?;
                crate::telemetry::flush_deferred_logs();
                p
            } else {
                server.poll()?
            }
        } else {
            Progress::IDLE
        };
        control.beat();
        if done.0 > 0 {
            control.add_work(done.0, monotonic_ns());
            continue;
        }
        let policy = if running {
            opts.spin
        } else {
            SpinPolicy::PARK_AT_ONCE
        };
        let fd = if running { server.wait_fd() } else { None };
        let limit = if running { server.park_limit() } else { None };
        let park = limit.map_or(opts.park_timeout, |l| l.min(opts.park_timeout));
        let ready = || (running && server.has_work()) || cmds.has_data();
        // A doorbell with an eventfd is rung through it: park in poll, not on the futex.
        let outcome = match (fd, bell.eventfd().is_some()) {
            (Some(fd), _) => bell.wait_fds(policy, Some(park), ready, &[fd]).0,
            (None, true) => bell.wait_fds(policy, Some(park), ready, &[]).0,
            (None, false) => bell.wait(policy, Some(park), ready),
        };
        if outcome == WaitOutcome::TimedOut {
            continue;
        }
    }
}

/// Error codes in a `Handoff` reply.
pub mod handoff_error {
    /// The snapshot did not fit the snapshot area.
    pub const TOO_BIG: u64 = 1;
    /// The server could not write its snapshot.
    pub const SNAPSHOT: u64 = 2;
    /// No standby process with that pid waits (it withdrew, died or never registered).
    pub const NO_SUCCESSOR: u64 = 5;
}

/// The first half of a handoff: snapshot into the area, then reserve the successor. Returns
/// the snapshot's length, or an error code and why; nothing is released either way.
fn handoff_snapshot<S: Server>(
    server: &mut S,
    control: &ControlBlock,
    successor: u32,
) -> Result<u64, (u64, String)> {
    if !control.is_standby(successor) {
        return Err((
            handoff_error::NO_SUCCESSOR,
            format!("no process {successor} waits in standby"),
        ));
    }
    let bytes = server
        .snapshot()
        .map_err(|e| (handoff_error::SNAPSHOT, e.to_string()))?;
    control
        .write_snapshot(&bytes)
        .map_err(|e| (handoff_error::TOO_BIG, e.to_string()))?;
    if !control.reserve_standby(successor) {
        return Err((
            handoff_error::NO_SUCCESSOR,
            format!("standby process {successor} withdrew"),
        ));
    }
    Ok(bytes.len() as u64)
}

fn reply(replies: &mut keepnet_ipc::Producer<ControlMsg>, seq: u32, ok: bool, value: u64) {
    let msg = ControlMsg {
        kind: if ok { ControlMsg::OK } else { ControlMsg::ERR },
        seq,
        value,
    };
    if replies.push(msg).is_err() {
        warn!(seq, "reply ring full or corrupt; reply dropped");
    }
}

/// Fault injection for live-update drills (`KEEPNET_FAULT` in a server's environment, set by
/// a wrapper around the binary under test): how a bad build misbehaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Abort as soon as the process starts (after answering `--version`).
    CrashAtStart,
    /// Map the regions, then never become ready (nor a standby).
    HangBeforeReady,
    /// Refuse every snapshot handed over.
    RefuseState,
    /// Take over, then abort after this many milliseconds of running.
    CrashAfterMs(u64),
}

impl Fault {
    /// Parses `KEEPNET_FAULT`: `crash-at-start`, `hang-before-ready`, `refuse-state`,
    /// `crash-after-ms=N`.
    pub fn parse(s: &str) -> Result<Fault, String> {
        Ok(match s.trim() {
            "crash-at-start" => Fault::CrashAtStart,
            "hang-before-ready" => Fault::HangBeforeReady,
            "refuse-state" => Fault::RefuseState,
            other => match other.strip_prefix("crash-after-ms=") {
                Some(n) => Fault::CrashAfterMs(
                    n.parse()
                        .map_err(|e| format!("KEEPNET_FAULT={other:?}: {e}"))?,
                ),
                None => {
                    return Err(format!(
                        "KEEPNET_FAULT={other:?}: use crash-at-start, hang-before-ready, \
                         refuse-state or crash-after-ms=N"
                    ))
                }
            },
        })
    }

    fn from_env() -> Result<Option<Fault>, String> {
        match std::env::var("KEEPNET_FAULT") {
            Ok(v) if !v.trim().is_empty() => Fault::parse(&v).map(Some),
            _ => Ok(None),
        }
    }
}

/// The whole `main` of a server binary: tracing, boot from the environment, build the server,
/// run it. Exit code 0 after a requested stop or a handoff, 1 on failure (the supervisor
/// restarts it), 2 when it cannot start at all.
///
/// In standby (`KEEPNET_STANDBY=1`, a live update) the process maps its regions, registers
/// as a standby and waits; on the order it builds the server (claiming its rings), restores
/// the predecessor's snapshot when told to, reads the applications the supervisor queued on
/// its hotplug socket, and runs. A `Handoff` ends `run`: the server is dropped, which
/// releases every ring it claimed, and only then is the successor told to take over: no two
/// instances are ever on the same rings.
pub fn main<S, F>(name: &'static str, build: F) -> ExitCode
where
    S: Server,
    F: FnOnce(&mut Boot) -> Result<S, ServerError>,
{
    if std::env::args().nth(1).as_deref() == Some("--version") {
        println!("{}", version_line(name, S::state_formats()));
        return ExitCode::SUCCESS;
    }
    crate::telemetry::init();
    let span = info_span!("server", name);
    let _g = span.enter();
    let fault = match Fault::from_env() {
        Ok(f) => f,
        Err(e) => {
            error!(%e, "cannot start");
            eprintln!("{name}: {e}");
            return ExitCode::from(2);
        }
    };
    if fault == Some(Fault::CrashAtStart) {
        error!("fault injection: crashing at start");
        std::process::abort();
    }
    let mut boot = match Boot::from_env() {
        Ok(b) => b,
        Err(e) => {
            error!(%e, "cannot start");
            eprintln!("{name}: {e}");
            return ExitCode::from(2);
        }
    };
    if fault == Some(Fault::HangBeforeReady) {
        error!("fault injection: hanging before ready");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    let standby = boot.options().standby;
    if standby {
        // On its core already when the order comes: pinning then (in `run`) would move the
        // process in the middle of the blackout.
        if let Some(c) = boot.options().core {
            pin(c);
        }
        boot.premap();
    }
    let order = if standby {
        wait_for_handover(boot.control())
    } else {
        Handover::Fresh
    };
    if order == Handover::Abort {
        info!("standby ended by the supervisor");
        return ExitCode::SUCCESS;
    }
    let ordered = monotonic_ns();
    if standby {
        crate::telemetry::defer_logs();
        // Whoever ran on this block last has stopped touching the rings (a predecessor that
        // handed off, or a successor the supervisor reaped): claim over it at once.
        keepnet_ipc::ring::take_over_from(boot.control().pid());
    }
    let mut server = match build(&mut boot) {
        Ok(s) => s,
        Err(e) => {
            error!(%e, "cannot start");
            crate::telemetry::flush_deferred_logs();
            if standby {
                boot.control().set_handover_result(false);
            }
            return ExitCode::from(1);
        }
    };
    if order == Handover::Restore {
        let restored = if fault == Some(Fault::RefuseState) {
            Err(ServerError::Restore(
                "fault injection: this build refuses every snapshot".into(),
            ))
        } else {
            boot.control()
                .read_snapshot()
                .map_err(ServerError::from)
                .and_then(|b| server.restore(&b))
        };
        if let Err(e) = restored {
            error!(%e, "restore refused; not taking over");
            crate::telemetry::flush_deferred_logs();
            boot.control().set_handover_result(false);
            return ExitCode::from(1);
        }
        info!("restored state from the predecessor's snapshot");
    }
    let built = monotonic_ns();
    if standby {
        if S::HOTPLUG {
            match server.hotplug() {
                Ok(n) => info!(
                    messages = n,
                    "applications taken over from the hotplug socket"
                ),
                Err(e) => warn!(%e, "hotplug socket unreadable at takeover"),
            }
        }
        boot.control().forget_standby(std::process::id());
        boot.control().set_handover_result(true);
        let now = monotonic_ns();
        let handoff = boot.control().handoff_ns();
        info!(
            since_handoff_us = now.saturating_sub(handoff) / 1000,
            woke_us = ordered.saturating_sub(handoff) / 1000,
            build_restore_us = built.saturating_sub(ordered) / 1000,
            apps_us = now.saturating_sub(built) / 1000,
            "took over"
        );
    }
    if let Some(Fault::CrashAfterMs(ms)) = fault {
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(ms));
            error!(ms, "fault injection: crashing after running");
            std::process::abort();
        });
    }
    let (control, opts) = boot.into_parts();
    let end = run(&mut server, &control, &opts);
    crate::telemetry::flush_deferred_logs();
    match end {
        Ok(RunEnd::Stopped) => ExitCode::SUCCESS,
        Ok(RunEnd::HandedOff { successor }) => {
            // This instance touches no ring from here on: the successor claims over it
            // (`take_over_from`) without waiting for the teardown below, whose releases
            // are compare-and-swaps that leave a taken-over claim alone.
            control.set_state(ServerState::Stopped);
            control.hand_over(successor, Handover::Restore);
            // Stay off the CPU until the successor has polled (or 200 ms): our teardown and
            // exit (unmapping everything) would otherwise run first on the core the
            // successor woke on, and count in the blackout.
            let me = std::process::id();
            let until = std::time::Instant::now() + Duration::from_millis(200);
            while (control.pid() == me || control.first_poll_ns() == 0)
                && std::time::Instant::now() < until
            {
                std::thread::sleep(Duration::from_micros(50));
            }
            keepnet_ipc::region::keep_mappings_until_exit();
            drop(server);
            info!(successor, "handed over; exiting");
            ExitCode::SUCCESS
        }
        Err(e) => {
            error!(%e, "server failed");
            ExitCode::from(1)
        }
    }
}

/// What a server binary answers to `--version`: `keepnet-NAME BUILD state-format NEWEST reads
/// OLDEST-NEWEST` (one line; the supervisor parses it before a live update).
pub fn version_line(name: &str, formats: (u32, u32)) -> String {
    format!(
        "keepnet-{name} {BUILD_VERSION} state-format {} reads {}-{}",
        formats.1, formats.0, formats.1
    )
}

/// Standby: registers in a standby slot, then parks on the standby doorbell until an order
/// for this process comes. A standby whose supervisor died withdraws and ends (unless the
/// running instance reserved it first: its handover is then on its way).
fn wait_for_handover(control: &ControlBlock) -> Handover {
    let me = std::process::id();
    if !control.register_standby(me) {
        error!("both standby slots are taken; not waiting");
        return Handover::Abort;
    }
    let parent = nix::unistd::getppid();
    info!("standby: regions mapped, waiting for handover");
    let bell = control.standby_doorbell();
    loop {
        bell.wait(
            SpinPolicy::PARK_AT_ONCE,
            Some(Duration::from_millis(100)),
            || control.handover_for(me) != Handover::Wait,
        );
        let order = control.handover_for(me);
        if order != Handover::Wait {
            return order;
        }
        if nix::unistd::getppid() != parent && control.withdraw_standby(me) {
            warn!("standby: the supervisor is gone; withdrawing");
            return Handover::Abort;
        }
    }
}

/// Supervisor-side helper: sends `cmd` and waits up to `timeout` for the matching reply.
pub fn request(
    commands: &mut keepnet_ipc::Producer<ControlMsg>,
    replies: &mut keepnet_ipc::Consumer<ControlMsg>,
    seq: u32,
    cmd: Command,
    timeout: Duration,
) -> Result<Result<u64, u64>, RequestError> {
    commands
        .push(ControlMsg::command(cmd, seq))
        .map_err(|_| RequestError::Full)?;
    let deadline = std::time::Instant::now() + timeout;
    loop {
        while let Some(r) = replies.pop()? {
            if r.seq == seq {
                return Ok(if r.kind == ControlMsg::OK {
                    Ok(r.value)
                } else {
                    Err(r.value)
                });
            }
        }
        if std::time::Instant::now() >= deadline {
            return Err(RequestError::Timeout(timeout));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Why a control request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("command ring is full")]
    Full,
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Ring(#[from] RingError),
}

/// Opens the supervisor's ends of a control block's rings.
pub fn supervisor_ends(
    control: &ControlBlock,
) -> Result<
    (
        keepnet_ipc::Producer<ControlMsg>,
        keepnet_ipc::Consumer<ControlMsg>,
    ),
    RingError,
> {
    let mut p: keepnet_ipc::Producer<ControlMsg> = Ring::producer(&control.commands()?)?;
    p.set_doorbell(control.doorbell().clone());
    let c = control.replies()?.consumer()?;
    Ok((p, c))
}
