//! Baselines over byte streams: a pair of pipes, and a Unix stream socket pair. One message
//! is one `write` of 64 bytes; a batch is one `write` of 32 x 64 bytes. Reads block.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use nix::fcntl::OFlag;
use nix::unistd::pipe2;

use super::ParentCtx;
use crate::bench::fds::{HandOff, Inherited};
use crate::bench::ipc::control::CtlWriter;
use crate::bench::ipc::link::{Msg, Received, Rx, Tx, BATCH, MSG_SIZE};
use crate::bench::ipc::peer::PeerArgs;
use crate::bench::ipc::phases;
use crate::bench::ipc::report::Figures;
use crate::error::{Context, Error, Result};

/// Writing half: one `write` per operation.
#[derive(Debug)]
pub struct FdTx {
    f: File,
}

impl FdTx {
    pub fn new(fd: OwnedFd) -> Self {
        FdTx { f: File::from(fd) }
    }
}

impl Tx for FdTx {
    fn send_one(&mut self, m: &Msg, _abort: Instant) -> Result<()> {
        self.f.write_all(m).context("writing a message")
    }

    fn send_batch(&mut self, batch: &[Msg], _abort: Instant) -> Result<()> {
        self.f
            .write_all(batch.as_flattened())
            .context("writing a batch of messages")
    }
}

/// Reading half: one `read` of up to as many whole messages as the caller asks for; a
/// partial message is kept for the next read.
#[derive(Debug)]
pub struct FdRx {
    f: File,
    buf: Box<[u8; BATCH * MSG_SIZE]>,
    have: usize,
}

impl FdRx {
    pub fn new(fd: OwnedFd) -> Self {
        FdRx {
            f: File::from(fd),
            buf: Box::new([0; BATCH * MSG_SIZE]),
            have: 0,
        }
    }
}

impl Rx for FdRx {
    fn recv(&mut self, out: &mut [Msg], _abort: Instant) -> Result<Received> {
        let want = out.len().clamp(1, BATCH) * MSG_SIZE;
        while self.have < MSG_SIZE {
            match self.f.read(&mut self.buf[self.have..want]) {
                Ok(0) => {
                    return Err(Error::Peer(
                        "the other end closed (the peer exited or was killed)".into(),
                    ))
                }
                Ok(n) => self.have += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("reading messages"),
            }
        }
        let k = (self.have / MSG_SIZE).min(out.len());
        for (i, o) in out[..k].iter_mut().enumerate() {
            o.copy_from_slice(&self.buf[i * MSG_SIZE..(i + 1) * MSG_SIZE]);
        }
        self.buf.copy_within(k * MSG_SIZE..self.have, 0);
        self.have -= k * MSG_SIZE;
        Ok(Received::scan(&out[..k]))
    }
}

/// Two pipes: parent to peer, peer to parent.
pub fn parent_pipe(ctx: &ParentCtx) -> Result<Figures> {
    let (down_r, down_w) = pipe2(OFlag::O_CLOEXEC).context("creating a pipe")?;
    let (up_r, up_w) = pipe2(OFlag::O_CLOEXEC).context("creating a pipe")?;
    let mut handoff = HandOff::new();
    handoff.add("rx", down_r).add("tx", up_w);
    let peer = ctx.spawn(handoff, Vec::new())?;
    ctx.measure(&mut FdTx::new(down_w), &mut FdRx::new(up_r), peer)
}

/// One Unix stream socket pair, used in both directions.
pub fn parent_uds(ctx: &ParentCtx) -> Result<Figures> {
    let (ours, theirs) = UnixStream::pair().context("creating a Unix socket pair")?;
    let ours_rx = ours.try_clone().context("duplicating a socket")?;
    let theirs_rx = theirs.try_clone().context("duplicating a socket")?;
    let mut handoff = HandOff::new();
    handoff.add("rx", theirs_rx).add("tx", theirs);
    let peer = ctx.spawn(handoff, Vec::new())?;
    ctx.measure(
        &mut FdTx::new(OwnedFd::from(ours)),
        &mut FdRx::new(OwnedFd::from(ours_rx)),
        peer,
    )
}

/// Peer side of both.
pub fn child(_args: &PeerArgs, fds: &mut Inherited, ctl: &mut CtlWriter) -> Result<()> {
    let mut rx = FdRx::new(fds.take("rx")?);
    let mut tx = FdTx::new(fds.take("tx")?);
    phases::child(&mut tx, &mut rx, ctl)
}
