//! Baseline: two eventfds, one each way. A message is a `write(1)`, a batch of n is a
//! `write(n)`; the reader sums what it reads. The end of a phase is a write of
//! [`END_BIAS`], far above any count a phase sends.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::time::Instant;

use nix::sys::eventfd::{EfdFlags, EventFd};

use super::ParentCtx;
use crate::bench::fds::{HandOff, Inherited};
use crate::bench::ipc::control::CtlWriter;
use crate::bench::ipc::link::{Msg, Received, Rx, Tx};
use crate::bench::ipc::phases;
use crate::bench::ipc::report::Figures;
use crate::error::{Context, Error, Result};

/// Added to the counter to mark the end of a phase.
pub const END_BIAS: u64 = 1 << 40;

#[derive(Debug)]
pub struct EvTx {
    f: File,
}

impl EvTx {
    fn add(&mut self, n: u64) -> Result<()> {
        self.f
            .write_all(&n.to_ne_bytes())
            .context("writing an eventfd")
    }
}

impl Tx for EvTx {
    fn send_one(&mut self, _m: &Msg, _abort: Instant) -> Result<()> {
        self.add(1)
    }

    fn send_batch(&mut self, batch: &[Msg], _abort: Instant) -> Result<()> {
        self.add(batch.len() as u64)
    }

    fn send_end(&mut self, _abort: Instant) -> Result<()> {
        self.add(END_BIAS)
    }
}

#[derive(Debug)]
pub struct EvRx {
    f: File,
}

impl Rx for EvRx {
    const CARRIES_PAYLOAD: bool = false;

    fn recv(&mut self, _out: &mut [Msg], _abort: Instant) -> Result<Received> {
        let mut b = [0u8; 8];
        loop {
            match self.f.read(&mut b) {
                Ok(8) => break,
                Ok(n) => return Err(Error::Protocol(format!("eventfd read returned {n} bytes"))),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("reading an eventfd"),
            }
        }
        let v = u64::from_ne_bytes(b);
        let (n, end) = if v >= END_BIAS {
            (v - END_BIAS, true)
        } else {
            (v, false)
        };
        let n = usize::try_from(n)
            .map_err(|_| Error::Protocol(format!("eventfd count {n} does not fit usize")))?;
        Ok(Received { n, end })
    }
}

fn new_eventfd() -> Result<OwnedFd> {
    EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC)
        .map(OwnedFd::from)
        .context("creating an eventfd")
}

pub fn parent(ctx: &ParentCtx) -> Result<Figures> {
    let down = new_eventfd()?;
    let up = new_eventfd()?;
    let mut handoff = HandOff::new();
    handoff
        .add("rx", down.try_clone().context("duplicating an eventfd")?)
        .add("tx", up.try_clone().context("duplicating an eventfd")?);
    // If the watchdog kills the peer while we block reading `up`, it pokes `up` to wake us.
    let poke = up.try_clone().context("duplicating an eventfd")?;
    let peer = ctx.spawn(handoff, vec![poke])?;
    ctx.measure(
        &mut EvTx {
            f: File::from(down),
        },
        &mut EvRx { f: File::from(up) },
        peer,
    )
}

pub fn child(fds: &mut Inherited, ctl: &mut CtlWriter) -> Result<()> {
    let mut rx = EvRx {
        f: File::from(fds.take("rx")?),
    };
    let mut tx = EvTx {
        f: File::from(fds.take("tx")?),
    };
    phases::child(&mut tx, &mut rx, ctl)
}
