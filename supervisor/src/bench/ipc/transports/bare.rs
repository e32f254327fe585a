//! The hardware's limit: plain atomics in a shared region, no ring, no doorbell, pure
//! spinning (even on a shared core, where a wait costs a time slice; the plan bounds those
//! runs by count and time).
//!
//! * Ping-pong: one cache line each way; word 0 is a hand-off counter bumped (Release) after
//!   the message's first 56 bytes are stored in words 1..8.
//! * One-way, unbatched: a one-line mailbox, word 0 a full/empty flag, words 1..8 the message.
//! * One-way, batched: a block of [`BATCH`] lines (56 message bytes each) and a flag line
//!   holding how many messages the block holds (0 = empty): one hand-off per block.
//!
//! Messages carry 56 bytes here (the rest of their line is the flag or counter).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use keepnet_ipc::{Region, RegionKind, RegionLayout};

use super::ParentCtx;
use crate::bench::fds::{HandOff, Inherited};
use crate::bench::ipc::control::CtlWriter;
use crate::bench::ipc::link::{spin_until, Msg, Phase, Received, Rx, Tx, BATCH, MSG_SIZE};
use crate::bench::ipc::phases;
use crate::bench::ipc::report::Figures;
use crate::error::{Context, Error, Result};

/// Message words carried per line.
const WORDS: usize = 7;
/// Lines are spaced 128 bytes apart where they are handed over separately (adjacent-line
/// prefetch pairs lines).
const SPACING: usize = 128;

#[derive(Clone, Copy, Debug)]
struct Layout {
    down_rtt: usize,
    up_rtt: usize,
    mailbox: usize,
    block_flag: usize,
    block: usize,
    size: usize,
}

fn layout() -> Layout {
    let mut l = RegionLayout::new();
    let down_rtt = l.place(SPACING, SPACING);
    let up_rtt = l.place(SPACING, SPACING);
    let mailbox = l.place(SPACING, SPACING);
    let block_flag = l.place(SPACING, SPACING);
    let block = l.place(BATCH * MSG_SIZE, SPACING);
    Layout {
        down_rtt,
        up_rtt,
        mailbox,
        block_flag,
        block,
        size: l.size(),
    }
}

/// Eight words of one cache line.
struct Line<'r>([&'r AtomicU64; 8]);

impl<'r> Line<'r> {
    fn at(region: &'r Region, offset: usize) -> Result<Line<'r>> {
        let w = |i: usize| {
            region
                .atomic_u64(offset + 8 * i)
                .context("placing a shared line")
        };
        Ok(Line([
            w(0)?,
            w(1)?,
            w(2)?,
            w(3)?,
            w(4)?,
            w(5)?,
            w(6)?,
            w(7)?,
        ]))
    }

    /// Stores the message's first 56 bytes in words `first..first + 7` (Relaxed: a Release
    /// store of the flag or counter publishes them).
    #[inline]
    fn store(&self, first: usize, m: &Msg) {
        for (i, chunk) in m.chunks_exact(8).take(WORDS).enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            self.0[first + i].store(u64::from_le_bytes(b), Ordering::Relaxed);
        }
    }

    #[inline]
    fn load(&self, first: usize, m: &mut Msg) {
        for (i, chunk) in m.chunks_exact_mut(8).take(WORDS).enumerate() {
            chunk.copy_from_slice(&self.0[first + i].load(Ordering::Relaxed).to_le_bytes());
        }
    }
}

/// The parent-to-peer one-way structures.
struct OneWay<'r> {
    mailbox: Line<'r>,
    block_flag: &'r AtomicU64,
    block: Vec<Line<'r>>,
}

impl<'r> OneWay<'r> {
    fn at(region: &'r Region, l: &Layout) -> Result<OneWay<'r>> {
        Ok(OneWay {
            mailbox: Line::at(region, l.mailbox)?,
            block_flag: region
                .atomic_u64(l.block_flag)
                .context("placing the block flag")?,
            block: (0..BATCH)
                .map(|i| Line::at(region, l.block + i * MSG_SIZE))
                .collect::<Result<_>>()?,
        })
    }
}

pub struct BareTx<'r> {
    phase: Phase,
    rtt: Line<'r>,
    handoffs: u64,
    oneway: Option<OneWay<'r>>,
}

impl BareTx<'_> {
    fn oneway(&self) -> Result<&OneWay<'_>> {
        self.oneway
            .as_ref()
            .ok_or_else(|| Error::Protocol("the peer sends only in ping-pong".into()))
    }
}

impl Tx for BareTx<'_> {
    fn set_phase(&mut self, phase: Phase) {
        self.phase = phase;
    }

    fn send_one(&mut self, m: &Msg, abort: Instant) -> Result<()> {
        match self.phase {
            Phase::Rtt => {
                self.rtt.store(1, m);
                self.handoffs += 1;
                // Sync point: publishes the message words stored above.
                self.rtt.0[0].store(self.handoffs, Ordering::Release);
                Ok(())
            }
            Phase::Unbatched => {
                let mb = &self.oneway()?.mailbox;
                spin_until(abort, "bare mailbox", || {
                    mb.0[0].load(Ordering::Acquire) == 0
                })?;
                mb.store(1, m);
                mb.0[0].store(1, Ordering::Release);
                Ok(())
            }
            Phase::Batched => self.send_batch(std::slice::from_ref(m), abort),
        }
    }

    fn send_batch(&mut self, batch: &[Msg], abort: Instant) -> Result<()> {
        if self.phase != Phase::Batched {
            for m in batch {
                self.send_one(m, abort)?;
            }
            return Ok(());
        }
        let ow = self.oneway()?;
        spin_until(abort, "bare block", || {
            ow.block_flag.load(Ordering::Acquire) == 0
        })?;
        for (line, m) in ow.block.iter().zip(batch) {
            line.store(0, m);
        }
        ow.block_flag
            .store(batch.len().min(BATCH) as u64, Ordering::Release);
        Ok(())
    }
}

pub struct BareRx<'r> {
    phase: Phase,
    rtt: Line<'r>,
    seen: u64,
    oneway: Option<OneWay<'r>>,
}

impl Rx for BareRx<'_> {
    fn set_phase(&mut self, phase: Phase) {
        self.phase = phase;
    }

    fn recv(&mut self, out: &mut [Msg], abort: Instant) -> Result<Received> {
        let Some(first) = out.first_mut() else {
            return Ok(Received { n: 0, end: false });
        };
        match self.phase {
            Phase::Rtt => {
                let (word, seen) = (self.rtt.0[0], self.seen);
                let mut now = seen;
                spin_until(abort, "bare ping-pong", || {
                    now = word.load(Ordering::Acquire);
                    now != seen
                })?;
                self.seen = now;
                self.rtt.load(1, first);
                Ok(Received::scan(&out[..1]))
            }
            Phase::Unbatched => {
                let ow = self
                    .oneway
                    .as_ref()
                    .ok_or_else(|| Error::Protocol("no one-way lines".into()))?;
                let mb = &ow.mailbox;
                spin_until(abort, "bare mailbox", || {
                    mb.0[0].load(Ordering::Acquire) == 1
                })?;
                mb.load(1, first);
                // Sync point: hands the line back after our loads above.
                mb.0[0].store(0, Ordering::Release);
                Ok(Received::scan(&out[..1]))
            }
            Phase::Batched => {
                let ow = self
                    .oneway
                    .as_ref()
                    .ok_or_else(|| Error::Protocol("no one-way lines".into()))?;
                let mut n = 0;
                spin_until(abort, "bare block", || {
                    n = ow.block_flag.load(Ordering::Acquire);
                    n != 0
                })?;
                let n = usize::try_from(n).unwrap_or(usize::MAX);
                if n > BATCH || n > out.len() {
                    return Err(Error::Protocol(format!(
                        "bare block holds {n} messages, at most {} fit",
                        out.len().min(BATCH)
                    )));
                }
                for (line, o) in ow.block.iter().zip(&mut out[..n]) {
                    line.load(0, o);
                }
                ow.block_flag.store(0, Ordering::Release);
                Ok(Received::scan(&out[..n]))
            }
        }
    }
}

pub fn parent(ctx: &ParentCtx) -> Result<Figures> {
    let l = layout();
    let region = Region::create("bench-ipc-bare", RegionKind::TEST, l.size)
        .context("creating the bare region")?;
    let mut tx = BareTx {
        phase: Phase::Rtt,
        rtt: Line::at(&region, l.down_rtt)?,
        handoffs: 0,
        oneway: Some(OneWay::at(&region, &l)?),
    };
    let mut rx = BareRx {
        phase: Phase::Rtt,
        rtt: Line::at(&region, l.up_rtt)?,
        seen: 0,
        oneway: None,
    };
    let peer = ctx.spawn(HandOff::with_region(&region)?, Vec::new())?;
    ctx.measure(&mut tx, &mut rx, peer)
}

pub fn child(fds: &mut Inherited, ctl: &mut CtlWriter) -> Result<()> {
    let l = layout();
    let region =
        Region::open(fds.take("region")?, RegionKind::TEST).context("mapping the bare region")?;
    let mut tx = BareTx {
        phase: Phase::Rtt,
        rtt: Line::at(&region, l.up_rtt)?,
        handoffs: 0,
        oneway: None,
    };
    let mut rx = BareRx {
        phase: Phase::Rtt,
        rtt: Line::at(&region, l.down_rtt)?,
        seen: 0,
        oneway: Some(OneWay::at(&region, &l)?),
    };
    phases::child(&mut tx, &mut rx, ctl)
}
