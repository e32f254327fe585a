//! keepnet's own transport: two [`Ring`]s of 64-byte slots in one shared region, one each
//! way, each with a doorbell for its consumer (data) and one for its producer (room). The
//! spin policy follows the placement: spin on dedicated cores, park at once on a shared one.

use std::time::{Duration, Instant};

use keepnet_ipc::{
    Consumer, Doorbell, Producer, PushError, Region, RegionKind, RegionLayout, Ring, SpinPolicy,
    WaitOutcome,
};

use super::ParentCtx;
use crate::bench::fds::{HandOff, Inherited};
use crate::bench::ipc::control::CtlWriter;
use crate::bench::ipc::link::{Msg, Phase, Received, Rx, Tx, BATCH};
use crate::bench::ipc::peer::PeerArgs;
use crate::bench::ipc::phases;
use crate::bench::ipc::report::Figures;
use crate::bench::ipc::Placement;
use crate::error::{Context, Error, Result};

/// One ring slot: 64 bytes, as eight words. keepnet-ipc copies slots with volatile
/// accesses of the slot type's elements, so a `[u8; 64]` slot would move byte by byte (64
/// loads and 64 stores a slot); `[u64; 8]` moves in eight words.
pub type Slot = [u64; 8];

#[inline]
fn to_slot(m: &Msg) -> Slot {
    let mut s = [0u64; 8];
    for (w, c) in s.iter_mut().zip(m.chunks_exact(8)) {
        let mut b = [0u8; 8];
        b.copy_from_slice(c);
        *w = u64::from_le_bytes(b);
    }
    s
}

#[inline]
fn to_msg(s: &Slot, m: &mut Msg) {
    for (w, c) in s.iter().zip(m.chunks_exact_mut(8)) {
        c.copy_from_slice(&w.to_le_bytes());
    }
}

/// Slots per ring.
pub const CAPACITY: usize = 1024;
const TAG_DOWN: u32 = 0x6b6e_b001;
const TAG_UP: u32 = 0x6b6e_b002;
/// Doorbells go on their own 128-byte pair of lines (adjacent-line prefetch pairs lines).
const BELL_ALIGN: usize = 128;

/// Where everything sits in the region; parent and peer compute the same.
#[derive(Clone, Copy, Debug)]
struct Layout {
    down: usize,
    down_data: usize,
    down_room: usize,
    up: usize,
    up_data: usize,
    up_room: usize,
    size: usize,
}

fn layout() -> Layout {
    let mut l = RegionLayout::new();
    let ring = Ring::<Slot>::size_in_region(CAPACITY);
    let down = l.place(ring, Ring::<Slot>::ALIGN);
    let down_data = l.place(Doorbell::SIZE, BELL_ALIGN);
    let down_room = l.place(Doorbell::SIZE, BELL_ALIGN);
    let up = l.place(ring, Ring::<Slot>::ALIGN);
    let up_data = l.place(Doorbell::SIZE, BELL_ALIGN);
    let up_room = l.place(Doorbell::SIZE, BELL_ALIGN);
    Layout {
        down,
        down_data,
        down_room,
        up,
        up_data,
        up_room,
        size: l.size(),
    }
}

fn policy(p: Placement) -> SpinPolicy {
    match p {
        Placement::Pinned => SpinPolicy::never_park(),
        Placement::SharedCore => SpinPolicy::yield_then_park(std::time::Duration::from_micros(50)),
    }
}

/// The time left until a phase's `abort`, read from the clock once per phase rather than once
/// per wait (on a shared core a clock read per wait is a measurable part of a round trip).
/// A wait may therefore overrun `abort` by up to the phase's length; the watchdog bounds
/// the phase as a whole.
#[derive(Debug)]
struct WaitLimit {
    abort: Option<Instant>,
    limit: Duration,
}

impl WaitLimit {
    const fn new() -> Self {
        WaitLimit {
            abort: None,
            limit: Duration::ZERO,
        }
    }

    #[inline]
    fn until(&mut self, abort: Instant) -> Duration {
        if self.abort != Some(abort) {
            self.abort = Some(abort);
            self.limit = abort.saturating_duration_since(Instant::now());
        }
        self.limit
    }
}

/// Producer side: pushes (which ring the consumer's data bell), and waits on the room bell
/// when the ring is full.
pub struct RingTx {
    prod: Producer<Slot>,
    room: Doorbell,
    policy: SpinPolicy,
    limit: WaitLimit,
    scratch: [Slot; BATCH],
}

impl RingTx {
    fn wait_room(&mut self, abort: Instant) -> Result<()> {
        let prod = &mut self.prod;
        let timeout = self.limit.until(abort);
        match self.room.wait(self.policy, Some(timeout), || {
            prod.free_slots().map_or(true, |n| n > 0)
        }) {
            WaitOutcome::TimedOut => Err(Error::Timeout(
                "ring full: the consumer made no room".into(),
            )),
            WaitOutcome::Spun | WaitOutcome::Woken => Ok(()),
        }
    }
}

impl Tx for RingTx {
    fn send_one(&mut self, m: &Msg, abort: Instant) -> Result<()> {
        loop {
            match self.prod.push(to_slot(m)) {
                Ok(()) => return Ok(()),
                Err(PushError::Full(_)) => self.wait_room(abort)?,
                Err(PushError::Corrupt(e)) => return Err(e).context("pushing to the ring"),
            }
        }
    }

    fn send_batch(&mut self, batch: &[Msg], abort: Instant) -> Result<()> {
        let len = batch.len().min(BATCH);
        for (s, m) in self.scratch.iter_mut().zip(&batch[..len]) {
            *s = to_slot(m);
        }
        let mut sent = 0;
        while sent < len {
            let n = self
                .prod
                .push_slice(&self.scratch[sent..len])
                .context("pushing a batch to the ring")?;
            sent += n;
            if n == 0 {
                self.wait_room(abort)?;
            }
        }
        Ok(())
    }
}

/// Consumer side: waits on the data bell, pops, and (in the one-way phases, where the
/// producer may fill the ring) rings the producer's room bell.
pub struct RingRx {
    cons: Consumer<Slot>,
    data: Doorbell,
    room: Doorbell,
    policy: SpinPolicy,
    ring_room: bool,
    limit: WaitLimit,
    scratch: [Slot; BATCH],
}

impl Rx for RingRx {
    fn set_phase(&mut self, phase: Phase) {
        // In ping-pong at most one message is in flight: the producer never waits for room.
        self.ring_room = phase != Phase::Rtt;
    }

    fn recv(&mut self, out: &mut [Msg], abort: Instant) -> Result<Received> {
        if !self.cons.has_data() {
            let cons = &mut self.cons;
            let timeout = self.limit.until(abort);
            // A corrupt index ends the wait too; pop_batch below then reports it.
            let ready = || cons.available().map_or(true, |n| n > 0);
            if self.data.wait(self.policy, Some(timeout), ready) == WaitOutcome::TimedOut {
                return Err(Error::Timeout(
                    "ring empty: the producer sent nothing".into(),
                ));
            }
        }
        let len = out.len().min(BATCH);
        let n = self
            .cons
            .pop_batch(&mut self.scratch[..len])
            .context("popping from the ring")?;
        for (s, m) in self.scratch[..n].iter().zip(out.iter_mut()) {
            to_msg(s, m);
        }
        if self.ring_room {
            self.room.ring();
        }
        Ok(Received::scan(&out[..n]))
    }
}

pub fn parent(ctx: &ParentCtx) -> Result<Figures> {
    let l = layout();
    let region = Region::create("bench-ipc-ring", RegionKind::TEST, l.size)
        .context("creating the ring region")?;
    let down =
        Ring::<Slot>::init(&region, l.down, CAPACITY, TAG_DOWN).context("initialising a ring")?;
    let up = Ring::<Slot>::init(&region, l.up, CAPACITY, TAG_UP).context("initialising a ring")?;
    let bell = |off| Doorbell::init(&region, off).context("initialising a doorbell");
    let (down_data, down_room, up_data, up_room) = (
        bell(l.down_data)?,
        bell(l.down_room)?,
        bell(l.up_data)?,
        bell(l.up_room)?,
    );
    let policy = policy(ctx.placement);
    let mut prod = down.producer().context("claiming the producer side")?;
    prod.set_doorbell(down_data);
    let mut tx = RingTx {
        prod,
        room: down_room,
        policy,
        limit: WaitLimit::new(),
        scratch: [[0; 8]; BATCH],
    };
    let mut rx = RingRx {
        cons: up.consumer().context("claiming the consumer side")?,
        data: up_data,
        room: up_room,
        policy,
        ring_room: false,
        limit: WaitLimit::new(),
        scratch: [[0; 8]; BATCH],
    };
    let peer = ctx.spawn(HandOff::with_region(&region)?, Vec::new())?;
    ctx.measure(&mut tx, &mut rx, peer)
}

pub fn child(args: &PeerArgs, fds: &mut Inherited, ctl: &mut CtlWriter) -> Result<()> {
    let l = layout();
    let region =
        Region::open(fds.take("region")?, RegionKind::TEST).context("mapping the ring region")?;
    let down = Ring::<Slot>::open(&region, l.down, TAG_DOWN).context("opening a ring")?;
    let up = Ring::<Slot>::open(&region, l.up, TAG_UP).context("opening a ring")?;
    let bell = |off| Doorbell::attach(&region, off).context("attaching a doorbell");
    let policy = policy(args.placement);
    let mut prod = up.producer().context("claiming the producer side")?;
    prod.set_doorbell(bell(l.up_data)?);
    let mut tx = RingTx {
        prod,
        room: bell(l.up_room)?,
        policy,
        limit: WaitLimit::new(),
        scratch: [[0; 8]; BATCH],
    };
    let mut rx = RingRx {
        cons: down.consumer().context("claiming the consumer side")?,
        data: bell(l.down_data)?,
        room: bell(l.down_room)?,
        policy,
        ring_room: false,
        limit: WaitLimit::new(),
        scratch: [[0; 8]; BATCH],
    };
    phases::child(&mut tx, &mut rx, ctl)
}
