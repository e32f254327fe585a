//! The five transports. Each module sets up its shared objects in the parent, hands the
//! peer's ends over by inheritance, and builds a [`Tx`](super::link::Tx) and an
//! [`Rx`](super::link::Rx) on each side for the generic loops in [`super::phases`].

pub mod bare;
pub mod eventfd;
pub mod ring;
pub mod stream;

use std::os::fd::OwnedFd;

use super::control::CtlWriter;
use super::link::{Rx, Tx};
use super::peer::{Peer, PeerArgs};
use super::report::Figures;
use super::{phases, Placement, Plan, Transport};
use crate::bench::fds::{HandOff, Inherited};
use crate::error::{Error, Result};

/// What the parent knows about one (placement, transport) measurement.
#[derive(Clone, Copy, Debug)]
pub struct ParentCtx {
    pub transport: Transport,
    pub placement: Placement,
    pub peer_cpu: usize,
    pub plan: Plan,
}

impl ParentCtx {
    /// Starts the peer with `handoff`'s fds.
    pub fn spawn(&self, handoff: HandOff, pokes: Vec<OwnedFd>) -> Result<Peer> {
        Peer::spawn(
            self.transport,
            self.placement,
            self.peer_cpu,
            handoff,
            pokes,
        )
    }

    /// Runs every phase against `peer` and waits for it to exit.
    pub fn measure<T: Tx, R: Rx>(&self, tx: &mut T, rx: &mut R, mut peer: Peer) -> Result<Figures> {
        match phases::parent(tx, rx, &mut peer, &self.plan) {
            Ok(fig) => {
                peer.finish()?;
                Ok(fig)
            }
            Err(e) if peer.watchdog_fired() => Err(Error::Timeout(format!(
                "the phase overran its time limit and the peer was killed ({e})"
            ))),
            Err(e) => Err(e),
        }
    }
}

/// Parent side of one measurement.
pub fn run_parent(ctx: &ParentCtx) -> Result<Figures> {
    match ctx.transport {
        Transport::Ring => ring::parent(ctx),
        Transport::Pipe => stream::parent_pipe(ctx),
        Transport::Uds => stream::parent_uds(ctx),
        Transport::Eventfd => eventfd::parent(ctx),
        Transport::Bare => bare::parent(ctx),
    }
}

/// Peer side of one measurement.
pub fn run_child(args: &PeerArgs, fds: &mut Inherited, ctl: &mut CtlWriter) -> Result<()> {
    match args.transport {
        Transport::Ring => ring::child(args, fds, ctl),
        Transport::Pipe | Transport::Uds => stream::child(args, fds, ctl),
        Transport::Eventfd => eventfd::child(fds, ctl),
        Transport::Bare => bare::child(fds, ctl),
    }
}
