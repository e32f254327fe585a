//! The memory wire: a shared-memory Ethernet cable between two drivers, for tests that may
//! not touch the kernel's network (no root, no TAP).
//!
//! A wire is one region (created by the supervisor or a test, DESIGN rule 1) holding two SPSC
//! rings of fixed [`WIRE_FRAME_MAX`]-byte frame slots, one per direction (A to B, B to A), and
//! per direction a block of shared counters. Side A sends on the A-to-B ring and receives on
//! the other; side B the mirror image.
//!
//! ## Faults
//!
//! The sender applies seeded faults ([`FaultConfig`]) to each frame it sends, in this order:
//! loss (the frame is gone), corruption (one bit flipped), duplication (the frame goes out
//! twice), delay (the frame waits `delay_us` in the sender's private queue; the queue is FIFO,
//! so a delayed frame also holds back the frames behind it and delay never reorders), and
//! reordering (the frame is held back until the next frame has gone out; if no frame follows
//! within `reorder_hold_us` it goes out in order and does not count as reordered). Each fault
//! is counted in the region when it happens, so a test can compare what the receiver saw with
//! what was injected; the counters survive a driver restart. Frames held privately (delay and
//! reorder queues) are lost if the sending driver dies, like frames in flight on a real cable.
//!
//! ## Waking a parked receiver
//!
//! A receiver that parks (a driver with nothing to do) may hand its end an eventfd to poll
//! ([`WireEnd::with_rx_eventfd`]); the sender then holds the same eventfd
//! ([`WireEnd::with_peer_eventfd`]). Before parking, the receiver drains the eventfd, sets its
//! direction's `parked` flag, issues a SeqCst fence and checks the ring once more; a sender,
//! after publishing, issues a SeqCst fence and writes the eventfd only if `parked` was set
//! (clearing it). Either the receiver's re-check sees the frame or the sender sees the flag,
//! so no wake-up is lost and a busy link makes no syscalls. Without eventfds a parked driver
//! finds frames when its park times out.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::Arc;

use keepnet_ipc::{
    Consumer, Pod, Producer, PushError, Region, RegionError, RegionKind, RegionLayout, Ring,
    RingError,
};
use serde::Deserialize;

/// Largest frame a wire slot carries.
pub const WIRE_FRAME_MAX: usize = 2048;
/// Slots per direction by default.
pub const WIRE_SLOTS: usize = 1024;
/// Most frames a sender keeps in its private delay queue before `send` says "full".
pub const PENDING_MAX: usize = 4096;

const WIRE_MAGIC: u64 = u64::from_le_bytes(*b"KNWIRE01");
const TAG_A_TO_B: u32 = 0x22_0001;
const TAG_B_TO_A: u32 = 0x22_0002;

/// One frame on the wire.
#[repr(C)]
#[derive(Clone, Copy)]
struct WireSlot {
    len: u32,
    _pad: u32,
    data: [u8; WIRE_FRAME_MAX],
}

// SAFETY: repr(C) of two u32s and a byte array: no padding (4 + 4 + 2048, align 4), valid for
// any bit pattern (the length is checked by the receiver before use), no pointers, no Drop.
unsafe impl Pod for WireSlot {}

const EMPTY_SLOT: WireSlot = WireSlot {
    len: 0,
    _pad: 0,
    data: [0; WIRE_FRAME_MAX],
};

/// Which end of the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    A,
    B,
}

impl Side {
    /// The other end.
    pub fn peer(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }
    /// Index of the direction this side sends on (0: A to B, 1: B to A).
    fn dir(self) -> usize {
        match self {
            Side::A => 0,
            Side::B => 1,
        }
    }
}

/// Faults a sender injects, with their seed. Rates are probabilities per frame, in [0, 1].
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FaultConfig {
    /// Seed of the fault generator: the same seed and traffic give the same faults.
    pub seed: u64,
    /// Probability that a frame is lost.
    pub loss: f64,
    /// Probability that a frame goes out twice.
    pub duplicate: f64,
    /// Probability that a frame is held back behind the next one.
    pub reorder: f64,
    /// Probability that one bit of a frame is flipped.
    pub corrupt: f64,
    /// Probability that a frame is delayed by `delay_us`.
    pub delay: f64,
    /// Delay of a delayed frame, in microseconds.
    pub delay_us: u64,
    /// Longest a held-back frame waits for a frame to overtake it, in microseconds.
    pub reorder_hold_us: u64,
}

impl Default for FaultConfig {
    fn default() -> Self {
        FaultConfig {
            seed: 0,
            loss: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            corrupt: 0.0,
            delay: 0.0,
            delay_us: 1000,
            reorder_hold_us: 1000,
        }
    }
}

impl FaultConfig {
    /// No faults at all.
    pub fn none() -> FaultConfig {
        FaultConfig::default()
    }

    /// Checks every rate; the error names the bad field.
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in [
            ("loss", self.loss),
            ("duplicate", self.duplicate),
            ("reorder", self.reorder),
            ("corrupt", self.corrupt),
            ("delay", self.delay),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!(
                    "faults.{name} = {v} is not a probability in [0, 1]"
                ));
            }
        }
        Ok(())
    }

    /// True if any fault may happen.
    pub fn any(&self) -> bool {
        self.loss > 0.0
            || self.duplicate > 0.0
            || self.reorder > 0.0
            || self.corrupt > 0.0
            || self.delay > 0.0
    }
}

/// What happened to the frames sent in one direction. `sent` .. `delayed` are counted by the
/// sender, `received` and `bad_frames` by the receiver. With loss and duplication only,
/// `received == sent - lost + duplicated` once the wire is drained.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WireStats {
    /// Frames handed to `send` and accepted.
    pub sent: u64,
    pub lost: u64,
    pub duplicated: u64,
    /// Frames that arrived after a frame sent later.
    pub reordered: u64,
    pub corrupted: u64,
    pub delayed: u64,
    /// Frames the receiver took off the wire.
    pub received: u64,
    /// Slots with an impossible length, dropped by the receiver.
    pub bad_frames: u64,
}

// Offsets of the counters in a direction block.
const PARKED: usize = 0;
const SENT: usize = 8;
const LOST: usize = 16;
const DUPLICATED: usize = 24;
const REORDERED: usize = 32;
const CORRUPTED: usize = 40;
const DELAYED: usize = 48;
const RECEIVED: usize = 56;
const BAD: usize = 64;

/// Why a wire could not be made, opened or used.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("wire region: {0}")]
    Region(#[from] RegionError),
    #[error("wire ring: {0}")]
    Ring(#[from] RingError),
    #[error("not a wire region (magic {0:#018x})")]
    BadMagic(u64),
    #[error("wire region holds {0} slots per direction: must be a power of two, 1..=65536")]
    BadSlots(u64),
    #[error("wire faults: {0}")]
    BadFaults(String),
}

#[derive(Clone, Copy, Debug)]
struct Offsets {
    header: usize,
    dirs: [usize; 2],
    rings: [usize; 2],
    size: usize,
}

fn offsets(slots: usize) -> Offsets {
    let mut l = RegionLayout::new();
    let header = l.place(128, 128);
    let d0 = l.place(128, 128);
    let d1 = l.place(128, 128);
    let r0 = l.place(
        Ring::<WireSlot>::size_in_region(slots),
        Ring::<WireSlot>::ALIGN,
    );
    let r1 = l.place(
        Ring::<WireSlot>::size_in_region(slots),
        Ring::<WireSlot>::ALIGN,
    );
    Offsets {
        header,
        dirs: [d0, d1],
        rings: [r0, r1],
        size: l.size(),
    }
}

const TAGS: [u32; 2] = [TAG_A_TO_B, TAG_B_TO_A];

/// A wire region: two frame rings and their counters.
#[derive(Clone, Debug)]
pub struct Wire {
    region: Region,
    off: Offsets,
}

impl Wire {
    /// Creates a wire with `slots` frames per direction (a power of two).
    pub fn create(name: &str, slots: usize) -> Result<Wire, WireError> {
        if !slots.is_power_of_two() || slots > 65536 {
            return Err(WireError::BadSlots(slots as u64));
        }
        let off = offsets(slots);
        let region = Region::create(name, RegionKind::RINGS, off.size)?;
        for (dir, tag) in TAGS.iter().enumerate() {
            Ring::<WireSlot>::init(&region, off.rings[dir], slots, *tag)?;
        }
        region
            .atomic_u64(off.header + 8)?
            .store(slots as u64, Ordering::Relaxed);
        region
            .atomic_u64(off.header)?
            .store(WIRE_MAGIC, Ordering::Release);
        Ok(Wire { region, off })
    }

    /// Opens a wire region handed over by the supervisor.
    pub fn open(region: Region) -> Result<Wire, WireError> {
        let probe = offsets(1);
        let magic = region.atomic_u64(probe.header)?.load(Ordering::Acquire);
        if magic != WIRE_MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        let slots = region.atomic_u64(probe.header + 8)?.load(Ordering::Relaxed);
        if !slots.is_power_of_two() || slots > 65536 {
            return Err(WireError::BadSlots(slots));
        }
        let off = offsets(slots as usize);
        for (dir, tag) in TAGS.iter().enumerate() {
            Ring::<WireSlot>::open(&region, off.rings[dir], *tag)?;
        }
        Ok(Wire { region, off })
    }

    /// The region, to hand to a driver.
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// Opens end `side` (claiming its send and receive rings) with the faults its sender
    /// injects.
    pub fn end(&self, side: Side, faults: FaultConfig) -> Result<WireEnd, WireError> {
        faults.validate().map_err(WireError::BadFaults)?;
        let tx_dir = side.dir();
        let rx_dir = side.peer().dir();
        let tx = Ring::<WireSlot>::open(&self.region, self.off.rings[tx_dir], TAGS[tx_dir])?
            .producer()?;
        let rx = Ring::<WireSlot>::open(&self.region, self.off.rings[rx_dir], TAGS[rx_dir])?
            .consumer()?;
        Ok(WireEnd {
            wire: self.clone(),
            side,
            tx,
            rx,
            faulty: faults.any(),
            rng: SplitMix(faults.seed),
            faults,
            clock: Clock::Monotonic,
            pending: VecDeque::new(),
            held: None,
            rx_bell: None,
            peer_bell: None,
        })
    }

    fn cell(&self, dir: usize, field: usize) -> Option<&AtomicU64> {
        self.region.atomic_u64(self.off.dirs[dir] + field).ok()
    }

    fn add(&self, dir: usize, field: usize, n: u64) {
        if let Some(c) = self.cell(dir, field) {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    fn get(&self, dir: usize, field: usize) -> u64 {
        self.cell(dir, field)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Counters of the frames sent by `from`.
    pub fn stats(&self, from: Side) -> WireStats {
        let d = from.dir();
        WireStats {
            sent: self.get(d, SENT),
            lost: self.get(d, LOST),
            duplicated: self.get(d, DUPLICATED),
            reordered: self.get(d, REORDERED),
            corrupted: self.get(d, CORRUPTED),
            delayed: self.get(d, DELAYED),
            received: self.get(d, RECEIVED),
            bad_frames: self.get(d, BAD),
        }
    }
}

/// Where a wire end reads the time for delays.
#[derive(Clone, Debug, Default)]
pub enum Clock {
    /// CLOCK_MONOTONIC.
    #[default]
    Monotonic,
    /// A clock the test moves by hand (ns).
    Manual(Arc<AtomicU64>),
}

impl Clock {
    /// Now, in ns.
    pub fn now_ns(&self) -> u64 {
        match self {
            Clock::Monotonic => keepnet_server::control::monotonic_ns(),
            Clock::Manual(t) => t.load(Ordering::Acquire),
        }
    }
}

/// SplitMix64: small, fast, and good enough for fault decisions.
#[derive(Clone, Debug)]
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// True with probability `p` (no draw when `p` is 0).
    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && ((self.next() >> 11) as f64) / ((1u64 << 53) as f64) < p
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

struct Held {
    frames: Vec<Vec<u8>>,
    since: u64,
    release: u64,
}

/// One end of a wire: sends on its direction with faults, receives the other direction.
pub struct WireEnd {
    wire: Wire,
    side: Side,
    tx: Producer<WireSlot>,
    rx: Consumer<WireSlot>,
    faults: FaultConfig,
    faulty: bool,
    rng: SplitMix,
    clock: Clock,
    /// Frames accepted but not yet on the ring, with the time they may go.
    pending: VecDeque<(u64, Vec<u8>)>,
    /// A frame held back for reordering.
    held: Option<Held>,
    rx_bell: Option<OwnedFd>,
    peer_bell: Option<OwnedFd>,
}

impl std::fmt::Debug for WireEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WireEnd")
            .field("side", &self.side)
            .field("faults", &self.faults)
            .field("pending", &self.pending.len())
            .finish()
    }
}

impl WireEnd {
    /// Reads time from `clock` (for delays and reorder holds).
    pub fn with_clock(mut self, clock: Clock) -> WireEnd {
        self.clock = clock;
        self
    }

    /// The eventfd this end's owner polls while parked (see the module docs).
    pub fn with_rx_eventfd(mut self, fd: OwnedFd) -> WireEnd {
        self.rx_bell = Some(fd);
        self
    }

    /// The eventfd the other end's owner polls: written when it parked and a frame went out.
    pub fn with_peer_eventfd(mut self, fd: OwnedFd) -> WireEnd {
        self.peer_bell = Some(fd);
        self
    }

    /// Which end this is.
    pub fn side(&self) -> Side {
        self.side
    }

    /// The wire it belongs to.
    pub fn wire(&self) -> &Wire {
        &self.wire
    }

    /// Frames accepted by `send` but still waiting in the private delay/reorder queues.
    pub fn queued(&self) -> usize {
        self.pending.len() + self.held.as_ref().map_or(0, |h| h.frames.len())
    }

    fn tx_dir(&self) -> usize {
        self.side.dir()
    }

    fn rx_dir(&self) -> usize {
        self.side.peer().dir()
    }

    fn push_frame(&mut self, frame: &[u8]) -> io::Result<bool> {
        let mut slot = EMPTY_SLOT;
        let n = frame.len().min(WIRE_FRAME_MAX);
        slot.len = n as u32;
        slot.data[..n].copy_from_slice(&frame[..n]);
        match self.tx.push(slot) {
            Ok(()) => Ok(true),
            Err(PushError::Full(_)) => Ok(false),
            Err(PushError::Corrupt(e)) => Err(io::Error::other(e)),
        }
    }

    /// Wakes the peer if it parked (see the module docs).
    fn kick(&self) {
        let Some(fd) = &self.peer_bell else {
            return;
        };
        // Sync point: orders the tail we just published before the `parked` load (pairs
        // with the receiver's fence between setting `parked` and re-checking the ring).
        fence(Ordering::SeqCst);
        if let Some(parked) = self.wire.cell(self.tx_dir(), PARKED) {
            if parked.load(Ordering::Relaxed) != 0 && parked.swap(0, Ordering::Relaxed) != 0 {
                // EAGAIN (counter saturated) still leaves the fd readable.
                let _ = nix::unistd::write(fd, &1u64.to_ne_bytes());
            }
        }
    }

    fn flush_at(&mut self, now: u64) -> io::Result<()> {
        let hold = self.faults.reorder_hold_us.saturating_mul(1000);
        if self
            .held
            .as_ref()
            .is_some_and(|h| now >= h.since.saturating_add(hold))
        {
            if let Some(h) = self.held.take() {
                for f in h.frames {
                    self.pending.push_back((h.release, f));
                }
            }
        }
        let mut pushed = false;
        while let Some((release, f)) = self.pending.front() {
            if *release > now {
                break;
            }
            let f = f.clone();
            if !self.push_frame(&f)? {
                break;
            }
            self.pending.pop_front();
            pushed = true;
        }
        if pushed {
            self.kick();
        }
        Ok(())
    }

    fn deferred_due_at(&mut self, now: u64) -> bool {
        let hold = self.faults.reorder_hold_us.saturating_mul(1000);
        let held_due = self
            .held
            .as_ref()
            .is_some_and(|h| now >= h.since.saturating_add(hold));
        let front_due = self.pending.front().is_some_and(|(r, _)| *r <= now);
        (held_due || front_due) && self.tx.free_slots().map_or(true, |n| n > 0)
    }

    /// Sends one frame through the fault model. `Ok(false)`: the ring (no faults) or the
    /// private queue is full.
    pub fn send(&mut self, frame: &[u8]) -> io::Result<bool> {
        if frame.len() > WIRE_FRAME_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "frame of {} bytes exceeds the wire's {WIRE_FRAME_MAX}-byte slots",
                    frame.len()
                ),
            ));
        }
        let dir = self.tx_dir();
        if !self.faulty && self.pending.is_empty() && self.held.is_none() {
            let ok = self.push_frame(frame)?;
            if ok {
                self.wire.add(dir, SENT, 1);
                self.kick();
            }
            return Ok(ok);
        }
        let now = self.clock.now_ns();
        self.flush_at(now)?;
        if self.pending.len() >= PENDING_MAX {
            return Ok(false);
        }
        self.wire.add(dir, SENT, 1);
        if self.rng.chance(self.faults.loss) {
            self.wire.add(dir, LOST, 1);
            return Ok(true);
        }
        let mut f = frame.to_vec();
        if self.rng.chance(self.faults.corrupt) && !f.is_empty() {
            let bit = self.rng.below(f.len() * 8);
            f[bit / 8] ^= 1 << (bit % 8);
            self.wire.add(dir, CORRUPTED, 1);
        }
        let copies = if self.rng.chance(self.faults.duplicate) {
            self.wire.add(dir, DUPLICATED, 1);
            2
        } else {
            1
        };
        let release = if self.rng.chance(self.faults.delay) {
            self.wire.add(dir, DELAYED, 1);
            now.saturating_add(self.faults.delay_us.saturating_mul(1000))
        } else {
            now
        };
        let hold = self.rng.chance(self.faults.reorder);
        if hold && self.held.is_none() {
            self.held = Some(Held {
                frames: vec![f; copies],
                since: now,
                release,
            });
        } else {
            for _ in 1..copies {
                self.pending.push_back((release, f.clone()));
            }
            self.pending.push_back((release, f));
            if let Some(h) = self.held.take() {
                // This frame overtakes the held one.
                self.wire.add(dir, REORDERED, 1);
                for x in h.frames {
                    self.pending.push_back((h.release.max(release), x));
                }
            }
        }
        self.flush_at(now)?;
        Ok(true)
    }

    /// Receives one frame; `Ok(None)` when the ring is empty. Slots with an impossible
    /// length are counted (`bad_frames`) and skipped.
    pub fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let dir = self.rx_dir();
        loop {
            let slot = match self.rx.pop() {
                Ok(Some(s)) => s,
                Ok(None) => return Ok(None),
                Err(e) => return Err(io::Error::other(e)),
            };
            let len = slot.len as usize;
            if len > WIRE_FRAME_MAX {
                self.wire.add(dir, BAD, 1);
                continue;
            }
            self.wire.add(dir, RECEIVED, 1);
            let n = len.min(buf.len());
            buf[..n].copy_from_slice(&slot.data[..n]);
            return Ok(Some(n));
        }
    }

    /// Pushes out delayed and held frames whose time has come.
    pub fn flush(&mut self) -> io::Result<()> {
        let now = self.clock.now_ns();
        self.flush_at(now)
    }

    /// True if delayed or held-back frames could go out now.
    pub fn deferred_due(&mut self) -> bool {
        let now = self.clock.now_ns();
        self.deferred_due_at(now)
    }

    /// True if a frame waits; otherwise, with an rx eventfd, arms the wake-up (see the module
    /// docs) and checks once more.
    pub fn ready(&mut self) -> bool {
        if self.rx.has_data() {
            return true;
        }
        let Some(fd) = &self.rx_bell else {
            return false;
        };
        let mut buf = [0u8; 8];
        // Drain the eventfd (non-blocking or not, it is readable only when non-zero).
        let _ = nix::unistd::read(fd.as_raw_fd(), &mut buf);
        if let Some(parked) = self.wire.cell(self.rx_dir(), PARKED) {
            parked.store(1, Ordering::Relaxed);
        }
        // Sync point: orders `parked = 1` before the re-check (pairs with the sender's fence
        // in `kick`).
        fence(Ordering::SeqCst);
        self.rx.has_data()
    }
}

impl crate::LinkBackend for WireEnd {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        WireEnd::recv(self, buf)
    }
    fn send(&mut self, frame: &[u8]) -> io::Result<bool> {
        WireEnd::send(self, frame)
    }
    fn wait_fd(&self) -> Option<RawFd> {
        self.rx_bell.as_ref().map(|f| f.as_raw_fd())
    }
    fn ready(&mut self) -> bool {
        WireEnd::ready(self)
    }
    fn deferred_due(&mut self) -> bool {
        WireEnd::deferred_due(self)
    }
    fn holds_frames(&self) -> bool {
        true
    }
    fn flush(&mut self) -> io::Result<()> {
        WireEnd::flush(self)
    }
    fn counters(&self) -> Vec<(&'static str, u64)> {
        let s = self.wire.stats(self.side);
        let r = self.wire.stats(self.side.peer());
        vec![
            ("wire.sent", s.sent),
            ("wire.lost", s.lost),
            ("wire.duplicated", s.duplicated),
            ("wire.reordered", s.reordered),
            ("wire.corrupted", s.corrupted),
            ("wire.delayed", s.delayed),
            ("wire.received", r.received),
            ("wire.bad_frames", r.bad_frames),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(faults: FaultConfig) -> (WireEnd, WireEnd) {
        let w = Wire::create("t-wire", 64).unwrap();
        let a = w.end(Side::A, faults).unwrap();
        let b = w.end(Side::B, FaultConfig::none()).unwrap();
        (a, b)
    }

    #[test]
    fn frames_cross_both_ways_and_full_ring_says_so() {
        let (mut a, mut b) = pair(FaultConfig::none());
        let mut buf = [0u8; WIRE_FRAME_MAX];
        assert_eq!(b.recv(&mut buf).unwrap(), None);
        for i in 0..64u8 {
            assert!(a.send(&[i; 60]).unwrap());
        }
        assert!(!a.send(&[0; 60]).unwrap(), "65th frame on a 64-slot ring");
        for i in 0..64u8 {
            assert_eq!(b.recv(&mut buf).unwrap(), Some(60));
            assert_eq!(buf[..60], [i; 60]);
        }
        assert!(b.send(&[7; 100]).unwrap());
        assert_eq!(a.recv(&mut buf).unwrap(), Some(100));
        assert!(a.send(&[0; WIRE_FRAME_MAX + 1]).is_err());
        let s = a.wire().stats(Side::A);
        assert_eq!((s.sent, s.received), (64, 64));
    }

    #[test]
    fn open_checks_the_region() {
        let w = Wire::create("t-wire-open", 16).unwrap();
        let again = Wire::open(w.region().reopen(RegionKind::RINGS).unwrap()).unwrap();
        let _a = again.end(Side::A, FaultConfig::none()).unwrap();
        assert!(
            again.end(Side::A, FaultConfig::none()).is_err(),
            "side claimed twice"
        );
        let other = Region::create("t-not-wire", RegionKind::RINGS, 8192).unwrap();
        assert!(matches!(Wire::open(other), Err(WireError::BadMagic(0))));
        let bad = FaultConfig {
            loss: 1.5,
            ..FaultConfig::none()
        };
        let e = w.end(Side::B, bad).unwrap_err().to_string();
        assert!(e.contains("faults.loss"), "{e}");
    }

    #[test]
    fn delay_waits_for_the_clock_and_keeps_order() {
        let t = Arc::new(AtomicU64::new(1_000_000));
        let faults = FaultConfig {
            delay: 1.0,
            delay_us: 10,
            ..FaultConfig::none()
        };
        let (a, mut b) = pair(faults);
        let mut a = a.with_clock(Clock::Manual(t.clone()));
        let mut buf = [0u8; 64];
        for i in 0..3u8 {
            assert!(a.send(&[i; 60]).unwrap());
        }
        assert_eq!(b.recv(&mut buf).unwrap(), None, "delayed frames left early");
        assert_eq!(a.queued(), 3);
        assert!(!a.deferred_due());
        t.fetch_add(10_000, Ordering::Release);
        assert!(a.deferred_due(), "due frames are work");
        a.flush().unwrap();
        for i in 0..3u8 {
            assert_eq!(b.recv(&mut buf).unwrap(), Some(60));
            assert_eq!(buf[0], i);
        }
        assert_eq!(a.wire().stats(Side::A).delayed, 3);
    }

    #[test]
    fn held_frame_without_follower_goes_out_in_order() {
        let t = Arc::new(AtomicU64::new(0));
        let faults = FaultConfig {
            reorder: 1.0,
            reorder_hold_us: 5,
            ..FaultConfig::none()
        };
        let (a, mut b) = pair(faults);
        let mut a = a.with_clock(Clock::Manual(t.clone()));
        let mut buf = [0u8; 64];
        assert!(a.send(&[1; 60]).unwrap());
        assert_eq!(b.recv(&mut buf).unwrap(), None);
        assert!(a.send(&[2; 60]).unwrap());
        assert_eq!(b.recv(&mut buf).unwrap(), Some(60));
        assert_eq!(buf[0], 2, "second frame overtakes the held first");
        assert_eq!(b.recv(&mut buf).unwrap(), Some(60));
        assert_eq!(buf[0], 1);
        // A third frame is held again; with nobody to overtake it, it leaves after the hold.
        assert!(a.send(&[3; 60]).unwrap());
        assert_eq!(b.recv(&mut buf).unwrap(), None);
        t.store(10_000, Ordering::Release);
        a.flush().unwrap();
        assert_eq!(b.recv(&mut buf).unwrap(), Some(60));
        assert_eq!(buf[0], 3);
        assert_eq!(a.wire().stats(Side::A).reordered, 1);
    }

    #[test]
    fn eventfd_wakes_a_parked_receiver_only() {
        let w = Wire::create("t-wire-bell", 16).unwrap();
        let efd = keepnet_ipc::new_eventfd().unwrap();
        let mut b = w
            .end(Side::B, FaultConfig::none())
            .unwrap()
            .with_rx_eventfd(efd.try_clone().unwrap());
        let mut a = w
            .end(Side::A, FaultConfig::none())
            .unwrap()
            .with_peer_eventfd(efd);
        let readable = |b: &WireEnd| {
            let fd = crate::LinkBackend::wait_fd(b).unwrap();
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one live pollfd, zero timeout.
            unsafe { libc::poll(&mut p, 1, 0) == 1 }
        };
        // Not parked: no syscall, fd stays quiet.
        assert!(a.send(&[1; 60]).unwrap());
        assert!(!readable(&b));
        let mut buf = [0u8; 64];
        assert_eq!(b.recv(&mut buf).unwrap(), Some(60));
        // Parked: the next frame makes the fd readable.
        assert!(!b.ready());
        assert!(a.send(&[2; 60]).unwrap());
        assert!(readable(&b));
        assert!(b.ready());
        assert_eq!(b.recv(&mut buf).unwrap(), Some(60));
        assert!(!b.ready(), "drained and re-armed");
        assert!(!readable(&b));
    }
}
