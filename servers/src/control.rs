//! The control region of one server: what the supervisor and the server share about it.
//!
//! | part | written by | read by |
//! |---|---|---|
//! | [`ControlShm`]: pid, core, state, heartbeat, work counter, batch timestamps | server | supervisor, status |
//! | generation (own cache line) | server, bumped at each start | peers, supervisor |
//! | doorbell | producers into this server (the supervisor too) | the server parks on it |
//! | command ring | supervisor | server |
//! | reply ring | server | supervisor |
//! | snapshot area: length + bytes | server on `Snapshot`, supervisor for a successor | server on `Restore` |

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use keepnet_ipc::{
    Doorbell, Generation, Pod, Region, RegionError, RegionKind, RegionLayout, Ring, RingError,
    SharedU64,
};

/// Bumped whenever [`ControlShm`] or the layout after it changes: a live update hands the
/// block to a binary built from other sources, which must refuse a layout it does not know.
const CONTROL_MAGIC: u64 = u64::from_le_bytes(*b"KNCTRL02");
const CMD_TAG: u32 = 0xC0DE_0001;
const REPLY_TAG: u32 = 0xC0DE_0002;
const RING_CAP: usize = 64;

/// What a server is doing, as the supervisor sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ServerState {
    /// Not started yet (or the region is fresh).
    Down = 0,
    /// Mapping regions, restoring state.
    Starting = 1,
    /// Polling its rings.
    Running = 2,
    /// Stopped at a batch boundary on request; rings buffer traffic meanwhile.
    Quiesced = 3,
    /// Exited cleanly on request.
    Stopped = 4,
}

impl ServerState {
    fn from_u32(v: u32) -> Option<ServerState> {
        Some(match v {
            0 => ServerState::Down,
            1 => ServerState::Starting,
            2 => ServerState::Running,
            3 => ServerState::Quiesced,
            4 => ServerState::Stopped,
            _ => return None,
        })
    }

    /// Lower-case name for status output.
    pub fn as_str(&self) -> &'static str {
        match self {
            ServerState::Down => "down",
            ServerState::Starting => "starting",
            ServerState::Running => "running",
            ServerState::Quiesced => "quiesced",
            ServerState::Stopped => "stopped",
        }
    }
}

/// A supervisor request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Stop polling at the next batch boundary and reply `Ok`.
    Quiesce,
    /// Write a snapshot of private state into the snapshot area; reply with its length.
    Snapshot,
    /// Restore private state from the snapshot area (a successor in standby).
    Restore,
    /// Go back to polling.
    Resume,
    /// Exit cleanly.
    Stop,
    /// Read what the supervisor queued on the server's hotplug socket (fd `hotplug`): an
    /// application attached or went away. Reply value: messages handled.
    Hotplug,
    /// Fault injection (`keepnet kill SERVER --scribble`): write garbage into the rings the
    /// server produces on, then abort. The message's `value` is the pid it is meant for; any
    /// other instance (a successor reading a stale command) ignores it. No reply.
    Scribble,
    /// Live update: at the next batch boundary, write a snapshot into the snapshot area,
    /// reserve the standby successor whose pid is the message's `value`, reply with the
    /// snapshot's length, release every ring and hand over to that successor, then exit.
    /// On any failure reply an error and go on serving (nothing was released).
    Handoff,
}

/// A slot on the command and reply rings.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ControlMsg {
    /// 1 Quiesce, 2 Snapshot, 3 Restore, 4 Resume, 5 Stop, 6 Hotplug, 7 Scribble, 8 Handoff;
    /// replies:
    /// 100 Ok, 101 Err.
    pub kind: u32,
    /// The request id a reply answers.
    pub seq: u32,
    /// A value: snapshot length, error code.
    pub value: u64,
}

// The one unsafe item in this crate: promising the Pod contract for a shared slot type.
// SAFETY: repr(C) integers only, no padding (4 + 4 + 8), valid for any bits, no pointers.
#[allow(unsafe_code)]
unsafe impl Pod for ControlMsg {}

impl ControlMsg {
    /// Reply kind: success.
    pub const OK: u32 = 100;
    /// Reply kind: failure (value is an error code).
    pub const ERR: u32 = 101;

    /// Encodes a command.
    pub fn command(c: Command, seq: u32) -> ControlMsg {
        let kind = match c {
            Command::Quiesce => 1,
            Command::Snapshot => 2,
            Command::Restore => 3,
            Command::Resume => 4,
            Command::Stop => 5,
            Command::Hotplug => 6,
            Command::Scribble => 7,
            Command::Handoff => 8,
        };
        ControlMsg {
            kind,
            seq,
            value: 0,
        }
    }

    /// Decodes a command; None for an unknown kind (counted and ignored by the server).
    pub fn as_command(&self) -> Option<Command> {
        Some(match self.kind {
            1 => Command::Quiesce,
            2 => Command::Snapshot,
            3 => Command::Restore,
            4 => Command::Resume,
            5 => Command::Stop,
            6 => Command::Hotplug,
            7 => Command::Scribble,
            8 => Command::Handoff,
            _ => return None,
        })
    }
}

/// Shared fields of the control block. Never referenced directly: each field is an
/// `AtomicU64` reached through [`Region::atomic_u64`] at its `offset_of!`, so this crate needs
/// no `unsafe`.
#[repr(C, align(128))]
struct ControlShm {
    magic: u64,
    pid: u64,
    /// Core the server pinned itself to, or u64::MAX.
    core: u64,
    state: u64,
    /// Bumped every loop iteration, parked or not (the park has a timeout): a stalled
    /// heartbeat means the server is stopped or stuck.
    heartbeat: u64,
    /// Items of work done in total.
    work: u64,
    /// CLOCK_MONOTONIC ns of the end of the last batch that did work.
    last_batch_ns: u64,
    /// CLOCK_MONOTONIC ns of the first batch after the last start or resume.
    first_batch_ns: u64,
    /// Unknown control messages dropped.
    bad_commands: u64,
    snapshot_capacity: u64,
    snapshot_len: u64,
    /// Two slots for processes waiting in standby (live update: the successor, and the
    /// predecessor's binary kept ready for a rollback): each holds a pid, with
    /// [`STANDBY_RESERVED`] set once the running instance has reserved it for its handover.
    standby_pid: u64,
    standby_pid2: u64,
    /// The order to a standby process: its pid in the high 32 bits, a [`Handover`] below.
    handover: u64,
    /// Written by the successor: 1 took over, 2 refused (it then exits non-zero).
    handover_result: u64,
    /// CLOCK_MONOTONIC ns at which an instance that handed over stopped polling.
    handoff_ns: u64,
    /// CLOCK_MONOTONIC ns of the first poll of the instance now running.
    first_poll_ns: u64,
    /// The snapshot formats the running build reads: newest in the low 32 bits, oldest above.
    state_formats: u64,
}

/// Set in a standby slot once the running instance has reserved that standby for its
/// handover: the standby may no longer withdraw.
pub const STANDBY_RESERVED: u64 = 1 << 32;

/// What a standby successor is told to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handover {
    /// Still waiting.
    Wait = 0,
    /// Build, restore the snapshot area, run.
    Restore = 1,
    /// Build and run from scratch.
    Fresh = 2,
    /// Exit without taking over.
    Abort = 3,
}

macro_rules! field {
    ($name:ident) => {
        std::mem::offset_of!(ControlShm, $name)
    };
}

/// Offsets of everything in a control region.
#[derive(Clone, Copy, Debug)]
struct Offsets {
    shm: usize,
    generation: usize,
    bell: usize,
    standby_bell: usize,
    cmd: usize,
    reply: usize,
    version: usize,
    counters: usize,
    snapshot: usize,
    size: usize,
}

/// Longest build version string.
pub const VERSION_LEN: usize = 32;

/// Number of named counters a control block holds.
pub const COUNTERS: usize = 64;
/// Longest counter name.
pub const COUNTER_NAME: usize = 40;

/// A named counter slot: a NUL-padded name and a value. Written by the server only.
#[repr(C, align(64))]
struct CounterSlot {
    name: [u8; COUNTER_NAME],
    value: u64,
}

fn offsets(snapshot_capacity: usize) -> Offsets {
    let mut l = RegionLayout::new();
    let shm = l.place(std::mem::size_of::<ControlShm>(), 128);
    let generation = l.place(Generation::SIZE, Generation::ALIGN);
    let bell = l.place(Doorbell::SIZE, Doorbell::ALIGN);
    let standby_bell = l.place(Doorbell::SIZE, Doorbell::ALIGN);
    let cmd = l.place(
        Ring::<ControlMsg>::size_in_region(RING_CAP),
        Ring::<ControlMsg>::ALIGN,
    );
    let reply = l.place(
        Ring::<ControlMsg>::size_in_region(RING_CAP),
        Ring::<ControlMsg>::ALIGN,
    );
    let version = l.place(VERSION_LEN, 64);
    let counters = l.place(COUNTERS * std::mem::size_of::<CounterSlot>(), 64);
    let snapshot = l.place(snapshot_capacity, 64);
    Offsets {
        shm,
        generation,
        bell,
        standby_bell,
        cmd,
        reply,
        version,
        counters,
        snapshot,
        size: l.size(),
    }
}

/// Why a control block could not be made or opened.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Region(#[from] RegionError),
    #[error(transparent)]
    Ring(#[from] RingError),
    #[error("not a control block (magic {0:#018x})")]
    BadMagic(u64),
    #[error("snapshot of {len} bytes does not fit the {capacity}-byte snapshot area")]
    SnapshotTooBig { len: usize, capacity: usize },
    #[error("snapshot area holds a length of {len} bytes, more than its {capacity}-byte capacity")]
    SnapshotCorrupt { len: u64, capacity: u64 },
}

/// A counter in a control block (see [`ControlBlock::counter`]). Cheap to increment.
#[derive(Clone, Debug)]
pub struct Counter(Option<SharedU64>);

impl Counter {
    /// Adds `n`.
    #[inline]
    pub fn add(&self, n: u64) {
        if let Some(c) = &self.0 {
            c.atomic().fetch_add(n, Ordering::Relaxed);
        }
    }
    /// Sets the value (a gauge, or state a successor restored).
    pub fn set(&self, v: u64) {
        if let Some(c) = &self.0 {
            c.atomic().store(v, Ordering::Relaxed);
        }
    }
    /// Adds one.
    #[inline]
    pub fn inc(&self) {
        self.add(1)
    }
    /// Current value.
    pub fn get(&self) -> u64 {
        self.0
            .as_ref()
            .map_or(0, |c| c.atomic().load(Ordering::Relaxed))
    }
}

/// A handle on a server's control region. The supervisor creates it; the server opens it.
#[derive(Clone, Debug)]
pub struct ControlBlock {
    region: Region,
    off: Offsets,
    snapshot_capacity: usize,
    generation: Generation,
    bell: Doorbell,
}

/// Monotonic clock in nanoseconds (CLOCK_MONOTONIC, comparable across processes).
pub fn monotonic_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => (ts.tv_sec() as u64).saturating_mul(1_000_000_000) + ts.tv_nsec() as u64,
        Err(_) => 0,
    }
}

impl ControlBlock {
    /// Creates a control region for server `name` with a snapshot area of the given size.
    pub fn create(name: &str, snapshot_capacity: usize) -> Result<ControlBlock, ControlError> {
        let off = offsets(snapshot_capacity);
        let region = Region::create(&format!("{name}-control"), RegionKind::CONTROL, off.size)?;
        Ring::<ControlMsg>::init(&region, off.cmd, RING_CAP, CMD_TAG)?;
        Ring::<ControlMsg>::init(&region, off.reply, RING_CAP, REPLY_TAG)?;
        let bell = Doorbell::init(&region, off.bell)?;
        Doorbell::init(&region, off.standby_bell)?;
        let generation = Generation::attach(&region, off.generation)?;
        let cb = ControlBlock {
            region,
            off,
            snapshot_capacity,
            generation,
            bell,
        };
        cb.cell(field!(core)).store(u64::MAX, Ordering::Relaxed);
        cb.cell(field!(snapshot_capacity))
            .store(snapshot_capacity as u64, Ordering::Relaxed);
        cb.cell(field!(magic))
            .store(CONTROL_MAGIC, Ordering::Release);
        Ok(cb)
    }

    /// Opens a control region received from the supervisor.
    pub fn open(region: Region) -> Result<ControlBlock, ControlError> {
        let probe = offsets(0);
        let magic = region
            .atomic_u64(probe.shm + field!(magic))?
            .load(Ordering::Acquire);
        if magic != CONTROL_MAGIC {
            return Err(ControlError::BadMagic(magic));
        }
        let cap_cell = region.atomic_u64(probe.shm + field!(snapshot_capacity))?;
        let capacity = usize::try_from(cap_cell.load(Ordering::Relaxed)).unwrap_or(usize::MAX);
        if capacity > region.len() {
            return Err(ControlError::SnapshotCorrupt {
                len: capacity as u64,
                capacity: region.len() as u64,
            });
        }
        let off = offsets(capacity);
        // The whole layout must fit the region we were handed.
        region.ptr_at(off.snapshot, capacity, 64)?;
        let bell = Doorbell::attach(&region, off.bell)?;
        Doorbell::attach(&region, off.standby_bell)?;
        let generation = Generation::attach(&region, off.generation)?;
        Ok(ControlBlock {
            region,
            off,
            snapshot_capacity: capacity,
            generation,
            bell,
        })
    }

    /// The region behind this block (to hand to the server).
    pub fn region(&self) -> &Region {
        &self.region
    }

    fn cell(&self, field: usize) -> &AtomicU64 {
        match self.region.atomic_u64(self.off.shm + field) {
            Ok(c) => c,
            Err(_) => unreachable!("control layout was validated when the handle was made"),
        }
    }

    /// Attaches the eventfd of this server's doorbell (for a server that also waits on other
    /// fds; see `keepnet_ipc::doorbell`). The supervisor and every producer into this server
    /// must attach the same eventfd.
    pub fn with_bell_eventfd(mut self, fd: std::os::fd::OwnedFd) -> ControlBlock {
        self.bell = self.bell.with_eventfd(fd);
        self
    }

    /// The server's doorbell: producers into the server ring it.
    pub fn doorbell(&self) -> &Doorbell {
        &self.bell
    }

    /// The server's generation.
    pub fn generation(&self) -> &Generation {
        &self.generation
    }

    /// The command ring (supervisor produces, server consumes).
    pub fn commands(&self) -> Result<Ring<ControlMsg>, RingError> {
        Ring::open(&self.region, self.off.cmd, CMD_TAG)
    }

    /// The reply ring (server produces, supervisor consumes).
    pub fn replies(&self) -> Result<Ring<ControlMsg>, RingError> {
        Ring::open(&self.region, self.off.reply, REPLY_TAG)
    }

    /// Pid of the server that last started on this block.
    pub fn pid(&self) -> u32 {
        self.cell(field!(pid)).load(Ordering::Acquire) as u32
    }
    pub(crate) fn set_pid(&self, pid: u32) {
        self.cell(field!(pid))
            .store(u64::from(pid), Ordering::Release)
    }

    /// Core the server is pinned to, if any.
    pub fn core(&self) -> Option<usize> {
        let c = self.cell(field!(core)).load(Ordering::Acquire);
        (c != u64::MAX).then_some(c as usize)
    }
    pub(crate) fn set_core(&self, core: Option<usize>) {
        self.cell(field!(core))
            .store(core.map_or(u64::MAX, |c| c as u64), Ordering::Release)
    }

    /// State as last published by the server (None if the field holds garbage).
    pub fn state(&self) -> Option<ServerState> {
        u32::try_from(self.cell(field!(state)).load(Ordering::Acquire))
            .ok()
            .and_then(ServerState::from_u32)
    }
    pub(crate) fn set_state(&self, s: ServerState) {
        self.cell(field!(state)).store(s as u64, Ordering::Release)
    }

    /// Heartbeat counter.
    pub fn heartbeat(&self) -> u64 {
        self.cell(field!(heartbeat)).load(Ordering::Acquire)
    }
    pub(crate) fn beat(&self) {
        self.cell(field!(heartbeat)).fetch_add(1, Ordering::Release);
    }

    /// Work items done in total.
    pub fn work(&self) -> u64 {
        self.cell(field!(work)).load(Ordering::Relaxed)
    }
    pub(crate) fn add_work(&self, n: u64, now: u64) {
        self.cell(field!(work)).fetch_add(n, Ordering::Relaxed);
        self.cell(field!(last_batch_ns))
            .store(now, Ordering::Release);
        let _ = self.cell(field!(first_batch_ns)).compare_exchange(
            0,
            now,
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
    }
    pub(crate) fn reset_first_batch(&self) {
        self.cell(field!(first_batch_ns))
            .store(0, Ordering::Release);
    }

    /// Monotonic ns of the last batch that did work (0 if none).
    pub fn last_batch_ns(&self) -> u64 {
        self.cell(field!(last_batch_ns)).load(Ordering::Acquire)
    }

    /// Monotonic ns of the first batch after the last start or resume (0 if none yet).
    pub fn first_batch_ns(&self) -> u64 {
        self.cell(field!(first_batch_ns)).load(Ordering::Acquire)
    }

    /// Unknown control messages the server dropped.
    pub fn bad_commands(&self) -> u64 {
        self.cell(field!(bad_commands)).load(Ordering::Relaxed)
    }
    pub(crate) fn count_bad_command(&self) {
        self.cell(field!(bad_commands))
            .fetch_add(1, Ordering::Relaxed);
    }

    /// The doorbell a standby successor parks on.
    pub fn standby_doorbell(&self) -> Doorbell {
        match Doorbell::attach(&self.region, self.off.standby_bell) {
            Ok(b) => b,
            Err(_) => unreachable!("standby doorbell was validated when the handle was made"),
        }
    }

    fn standby_slots(&self) -> [&AtomicU64; 2] {
        [
            self.cell(field!(standby_pid)),
            self.cell(field!(standby_pid2)),
        ]
    }

    /// Whether process `pid` waits in standby on this block (registered, reserved or not).
    pub fn is_standby(&self, pid: u32) -> bool {
        pid != 0
            && self
                .standby_slots()
                .iter()
                .any(|c| c.load(Ordering::Acquire) as u32 == pid)
    }

    /// The pids waiting in standby (0 for a free slot).
    pub fn standby_pids(&self) -> [u32; 2] {
        self.standby_slots()
            .map(|c| c.load(Ordering::Acquire) as u32)
    }

    /// Standby: takes a free slot for `pid`; false if both are taken.
    pub(crate) fn register_standby(&self, pid: u32) -> bool {
        self.standby_slots().iter().any(|c| {
            c.compare_exchange(0, u64::from(pid), Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        })
    }

    /// Standby: gives up its slot (its supervisor is gone). False if the running instance
    /// reserved it first: the handover is then on its way and must be taken.
    pub(crate) fn withdraw_standby(&self, pid: u32) -> bool {
        let mine = u64::from(pid);
        for c in self.standby_slots() {
            if c.compare_exchange(mine, 0, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                return true;
            }
            if c.load(Ordering::Acquire) == mine | STANDBY_RESERVED {
                return false;
            }
        }
        true
    }

    /// Running instance: reserves standby `pid` for its handover. False if no such standby
    /// waits (it withdrew or never came): the running instance then keeps serving.
    pub(crate) fn reserve_standby(&self, pid: u32) -> bool {
        let mine = u64::from(pid);
        self.standby_slots().iter().any(|c| {
            mine != 0
                && c.compare_exchange(
                    mine,
                    mine | STANDBY_RESERVED,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok()
        })
    }

    /// The current order to standby process `pid` (`Wait` if the order is for another).
    pub fn handover_for(&self, pid: u32) -> Handover {
        let v = self.cell(field!(handover)).load(Ordering::Acquire);
        if (v >> 32) as u32 != pid {
            return Handover::Wait;
        }
        match v & 0xffff_ffff {
            1 => Handover::Restore,
            2 => Handover::Fresh,
            3 => Handover::Abort,
            _ => Handover::Wait,
        }
    }

    /// Gives standby process `pid` its order (the supervisor, or the running instance once
    /// it has released its rings). Resets the result first.
    pub fn hand_over(&self, pid: u32, order: Handover) {
        self.cell(field!(handover_result))
            .store(0, Ordering::Release);
        self.cell(field!(handover))
            .store(u64::from(pid) << 32 | order as u64, Ordering::Release);
        // Two standbys may park on this doorbell: wake both, each re-checks its own order.
        self.standby_doorbell().ring_all();
    }

    /// Supervisor: prepares the block for new standby processes (none may be waiting).
    pub fn clear_handover(&self) {
        self.cell(field!(handover)).store(0, Ordering::Release);
        self.cell(field!(handover_result))
            .store(0, Ordering::Release);
        for c in self.standby_slots() {
            c.store(0, Ordering::Release);
        }
    }

    /// Frees the standby slot of `pid` (a standby that exited or was killed).
    pub fn forget_standby(&self, pid: u32) {
        for c in self.standby_slots() {
            let v = c.load(Ordering::Acquire);
            if v as u32 == pid && pid != 0 {
                let _ = c.compare_exchange(v, 0, Ordering::AcqRel, Ordering::Relaxed);
            }
        }
    }

    /// Monotonic ns at which the last instance that handed over stopped polling (0: none).
    pub fn handoff_ns(&self) -> u64 {
        self.cell(field!(handoff_ns)).load(Ordering::Acquire)
    }
    pub(crate) fn set_handoff_ns(&self, ns: u64) {
        self.cell(field!(handoff_ns)).store(ns, Ordering::Release)
    }

    /// Monotonic ns of the running instance's first poll (0 until it polls).
    pub fn first_poll_ns(&self) -> u64 {
        self.cell(field!(first_poll_ns)).load(Ordering::Acquire)
    }
    pub(crate) fn set_first_poll_ns(&self, ns: u64) {
        self.cell(field!(first_poll_ns))
            .store(ns, Ordering::Release)
    }

    /// The snapshot formats (oldest, newest) the running build reads, as it said at start;
    /// None before any build said.
    pub fn state_formats(&self) -> Option<(u32, u32)> {
        let v = self.cell(field!(state_formats)).load(Ordering::Acquire);
        (v != 0).then_some(((v >> 32) as u32, v as u32))
    }
    pub(crate) fn set_state_formats(&self, (oldest, newest): (u32, u32)) {
        self.cell(field!(state_formats)).store(
            u64::from(oldest) << 32 | u64::from(newest),
            Ordering::Release,
        )
    }

    /// The successor's answer: None while pending, Some(true) took over, Some(false) refused.
    pub fn handover_result(&self) -> Option<bool> {
        match self.cell(field!(handover_result)).load(Ordering::Acquire) {
            1 => Some(true),
            2 => Some(false),
            _ => None,
        }
    }
    pub(crate) fn set_handover_result(&self, ok: bool) {
        self.cell(field!(handover_result))
            .store(if ok { 1 } else { 2 }, Ordering::Release)
    }

    /// Build version of the server that last started on this block.
    pub fn version(&self) -> String {
        let mut raw = [0u8; VERSION_LEN];
        if self.region.read_bytes(self.off.version, &mut raw).is_err() {
            return String::new();
        }
        let end = raw.iter().position(|&b| b == 0).unwrap_or(VERSION_LEN);
        String::from_utf8_lossy(&raw[..end]).into_owned()
    }
    pub(crate) fn set_version(&self, v: &str) {
        let mut raw = [0u8; VERSION_LEN];
        for (d, s) in raw.iter_mut().zip(v.bytes()) {
            *d = s;
        }
        let _ = self.region.write_bytes(self.off.version, &raw);
    }

    /// Registers (or finds, after a restart) the counter `name` and returns a handle to it.
    /// Counters live in the control region, so they survive restarts. Names longer than
    /// [`COUNTER_NAME`] bytes are cut; past [`COUNTERS`] names, increments are discarded.
    pub fn counter(&self, name: &str) -> Counter {
        let mut want = [0u8; COUNTER_NAME];
        for (d, s) in want.iter_mut().zip(name.bytes()) {
            *d = s;
        }
        for i in 0..COUNTERS {
            let at = self.off.counters + i * std::mem::size_of::<CounterSlot>();
            let mut have = [0u8; COUNTER_NAME];
            if self.region.read_bytes(at, &mut have).is_err() {
                break;
            }
            if have == want {
                return Counter(SharedU64::at(&self.region, at + COUNTER_NAME).ok());
            }
            if have[0] == 0 {
                if self.region.write_bytes(at, &want).is_err() {
                    break;
                }
                return Counter(SharedU64::at(&self.region, at + COUNTER_NAME).ok());
            }
        }
        Counter(None)
    }

    /// Every registered counter, by name (for status).
    pub fn counters(&self) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        for i in 0..COUNTERS {
            let at = self.off.counters + i * std::mem::size_of::<CounterSlot>();
            let mut name = [0u8; COUNTER_NAME];
            if self.region.read_bytes(at, &mut name).is_err() || name[0] == 0 {
                break;
            }
            let end = name.iter().position(|&b| b == 0).unwrap_or(COUNTER_NAME);
            let value = self
                .region
                .atomic_u64(at + COUNTER_NAME)
                .map_or(0, |a| a.load(Ordering::Relaxed));
            out.push((String::from_utf8_lossy(&name[..end]).into_owned(), value));
        }
        out
    }

    /// Stores a snapshot in the snapshot area.
    pub fn write_snapshot(&self, bytes: &[u8]) -> Result<(), ControlError> {
        if bytes.len() > self.snapshot_capacity {
            return Err(ControlError::SnapshotTooBig {
                len: bytes.len(),
                capacity: self.snapshot_capacity,
            });
        }
        self.region.write_bytes(self.off.snapshot, bytes)?;
        self.cell(field!(snapshot_len))
            .store(bytes.len() as u64, Ordering::Release);
        Ok(())
    }

    /// Copies the snapshot area out (the length is checked against the capacity).
    pub fn read_snapshot(&self) -> Result<Vec<u8>, ControlError> {
        let len = self.cell(field!(snapshot_len)).load(Ordering::Acquire);
        if len > self.snapshot_capacity as u64 {
            return Err(ControlError::SnapshotCorrupt {
                len,
                capacity: self.snapshot_capacity as u64,
            });
        }
        let mut out = vec![0u8; len as usize];
        self.region.read_bytes(self.off.snapshot, &mut out)?;
        Ok(out)
    }

    /// Heartbeat check for the supervisor: true if the heartbeat moved within `within`
    /// (sampled twice, sleeping in between). For status tools, not the data path.
    pub fn heartbeat_moves(&self, within: Duration) -> bool {
        let a = self.heartbeat();
        std::thread::sleep(within);
        self.heartbeat() != a
    }
}
