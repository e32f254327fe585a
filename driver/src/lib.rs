//! keepnet link backends: TAP, the in-memory wire with fault injection, the pcap mirror, and
//! the driver server that moves frames between a backend and the ip server's link region.
//!
//! * [`tap`]: TAP devices (the supervisor creates them, the driver gets the fd).
//! * [`wire`]: a shared-memory cable between two drivers, with seeded loss, duplication,
//!   reordering, corruption and delay, for unprivileged tests.
//! * [`pcap`]: a classic pcap writer and [`pcap::drain_capture`] for `keepnet capture`.
//! * [`config`]: the `KEEPNET_DRIVER_CONFIG` JSON.
//! * [`server`]: the driver server (the `keepnet-driver` binary is a thin `main` over it).
//!
//! Both backends implement [`LinkBackend`], so one conformance suite runs against each.
//!
//! This crate uses `unsafe` for the TAP ioctls, for zero-copy access to frame buffers the
//! driver holds, and to mark the wire's slot type as plain data; each block carries a
//! `// SAFETY:` note.

use std::io;
use std::os::fd::RawFd;

pub mod config;
pub mod pcap;
pub mod server;
pub mod tap;
pub mod wire;

pub use config::{ConfigError, DriverConfig};
pub use server::Driver;
pub use tap::{Tap, TapError};
pub use wire::{Clock, FaultConfig, Side, Wire, WireEnd, WireError, WireStats};

/// A link a driver reads frames from and writes frames to. Both calls never block.
pub trait LinkBackend {
    /// Reads one frame into `buf`; `Ok(None)` when none is waiting. A frame longer than `buf`
    /// is cut to `buf.len()`.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>>;

    /// Writes one frame; `Ok(false)` when the link cannot take it now (try again later).
    fn send(&mut self, frame: &[u8]) -> io::Result<bool>;

    /// An fd that is readable while frames wait (the TAP device, the wire's eventfd): the
    /// driver parks on it together with its doorbell.
    fn wait_fd(&self) -> Option<RawFd> {
        None
    }

    /// Cheap check before parking: true if `recv` would find a frame. A backend that needs a
    /// wake-up arms it here. Backends whose readiness shows on [`LinkBackend::wait_fd`] alone
    /// may return false.
    fn ready(&mut self) -> bool {
        false
    }

    /// True if deferred sends (the wire's delayed and held-back frames) could move now.
    fn deferred_due(&mut self) -> bool {
        false
    }

    /// True if the backend keeps unread frames until they are read, without a time limit
    /// (the wire). With no free buffer or no room on `rx`, the driver then leaves frames
    /// where they are (backpressure); otherwise (a TAP, whose fd would stay readable and
    /// whose queue overflows anyway) it reads them and drops them, counted.
    fn holds_frames(&self) -> bool {
        false
    }

    /// Moves deferred work along (the wire's delayed and held-back frames). Called every poll.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    /// Named counters the backend keeps (the wire's injected faults), mirrored into the
    /// driver's control block for `keepnet status`.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
}

impl<B: LinkBackend + ?Sized> LinkBackend for Box<B> {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        (**self).recv(buf)
    }
    fn send(&mut self, frame: &[u8]) -> io::Result<bool> {
        (**self).send(frame)
    }
    fn wait_fd(&self) -> Option<RawFd> {
        (**self).wait_fd()
    }
    fn ready(&mut self) -> bool {
        (**self).ready()
    }
    fn deferred_due(&mut self) -> bool {
        (**self).deferred_due()
    }
    fn holds_frames(&self) -> bool {
        (**self).holds_frames()
    }
    fn flush(&mut self) -> io::Result<()> {
        (**self).flush()
    }
    fn counters(&self) -> Vec<(&'static str, u64)> {
        (**self).counters()
    }
}
